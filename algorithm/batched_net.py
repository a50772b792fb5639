"""The math of the batched PPO backend (`algorithm/batched_ppo.py`): n_tasks independent
SB3 `MlpPolicy` networks stored as batched tensors, their hand-written forward and backward
pass, one Adam per task, and the gradients of SB3's PPO loss. Pure tensor code: no
environments, processes or files. `tests/test_batched_ppo.py` checks every piece against
SB3 and autograd; `algorithm/batched_ppo.py`'s docstring says what follows SB3 and how.
"""
import math

import torch

HIDDEN = 64
ADAM_EPS = 1e-5  # SB3's default for Adam
TRUNK, HEADS = ("W1", "b1", "W2", "b2"), ("W_pi", "b_pi", "W_vf", "b_vf")


# ----------------------------------------------------------------------------- network

def _tanh_(z: torch.Tensor) -> torch.Tensor:
    """tanh in place. On CPU as 2 * sigmoid(2z) - 1: torch's CPU tanh is ~3x slower than
    sigmoid, and tanh is a large share of an update. The two agree within 2e-7."""
    if z.is_cuda:
        return z.tanh_()
    return z.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def _linear_tanh(bias, weight, x, out):
    """out = tanh(weight @ x + bias), batched (the 2z of `_tanh_` folded into the matmul on CPU)."""
    if out.is_cuda:
        return torch.baddbmm(bias, weight, x, out=out).tanh_()
    return torch.baddbmm(bias, weight, x, beta=2.0, alpha=2.0, out=out).sigmoid_().mul_(2.0).sub_(1.0)


def _tanh_backward_(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad *= 1 - h^2 in place, for h = tanh(z) (torch's fused kernel for it)."""
    return torch.ops.aten.tanh_backward.grad_input(grad, h, grad_input=grad)


def parameter_shapes(n_nets: int, obs_dim: int, n_actions: int) -> dict:
    """Shapes of BatchedActorCritic's tensors for n_nets networks (layout: see the class)."""
    B, D, H, A = n_nets, obs_dim, HIDDEN, n_actions
    return {"W1": (2, B, D, H), "b1": (2, B, 1, H), "W2": (2, B, H, H), "b2": (2, B, H, 1),
            "W_pi": (B, A, H), "b_pi": (B, A, 1), "W_vf": (B, 1, H), "b_vf": (B, 1, 1)}


def parameters_per_network(obs_dim: int, n_actions: int) -> int:
    return sum(math.prod(shape) for shape in parameter_shapes(1, obs_dim, n_actions).values())


class BatchedActorCritic:
    """`n_tasks` independent SB3 `MlpPolicy` networks, computed together.

    The policy and value trunks (two tanh layers each) of all tasks form 2 x n_tasks
    sub-networks stored branch-major: trunk tensors are (2, n_tasks, ...), branch 0 the
    policy and branch 1 the value net, so `view(2 * n_tasks, ...)` feeds `torch.bmm`
    and `[0]` / `[1]` are contiguous per-branch slices.

    The first layer is stored input-major, W1 (in, out) and b1 (1, out), and its
    activations row-major, (rows, features): with a one-hot input (MultiDiscrete
    observations) the layer is a sum of k rows of W1 per observation (`embedding_bag`)
    and its weight gradient a scatter-add of k rows (`index_add_`), instead of a matmul
    over mostly zeros (layer 1 of a darkroom update took 15% of its time as a matmul at
    a third of the speed of layer 2's). The rest is feature-major, (features, rows):
    W (out, in) like `nn.Linear.weight`, b (out, 1), a layer is `W @ x + b`. With this
    layout the heads (5 and 1 outputs) run as fast matmuls; row-major, MKL is 5-10x
    slower on them.

    `forward` keeps the activations of its last call with this minibatch size;
    `backward` turns loss gradients w.r.t. logits and values into parameter gradients
    in `self.grads` (preallocated, also attached as `.grad` for the optimizer).
    """

    def __init__(self, n_tasks: int, obs_dim: int, n_actions: int, device):
        self.n, self.obs_dim, self.n_actions, self.device = n_tasks, obs_dim, n_actions, device
        shapes = parameter_shapes(n_tasks, obs_dim, n_actions)
        self.params = {k: torch.zeros(s, device=device) for k, s in shapes.items()}
        self.grads = {k: torch.zeros(s, device=device) for k, s in shapes.items()}
        for k, p in self.params.items():
            p.grad = self.grads[k]
        # views made once (an update is short enough for Python overheads to matter): the
        # trunk as 2 x n_tasks matrices for bmm, each gradient as one row per network
        G = 2 * n_tasks
        self.P = {**self.params, **{k: self.params[k].view(G, *shapes[k][2:]) for k in TRUNK}}
        self.Gr = {**self.grads, **{k: self.grads[k].view(G, *shapes[k][2:]) for k in TRUNK}}
        self._grad_rows = ([self.grads[k].view(G, -1) for k in TRUNK], [self.grads[k].view(n_tasks, -1) for k in HEADS])
        self._buffers = {}

    # -- init
    def init_task(self, slot: int, generator: torch.Generator):
        """SB3's init for one task's network, drawn from that task's generator."""
        def orthogonal(n_in, n_out, gain):
            w = torch.empty(n_out, n_in)
            torch.nn.init.orthogonal_(w, gain=gain, generator=generator)
            return w.to(self.device)

        hidden, D, H, A = math.sqrt(2), self.obs_dim, HIDDEN, self.n_actions
        with torch.no_grad():
            for branch in (0, 1):  # policy trunk, then value trunk
                self.params["W1"][branch, slot] = orthogonal(D, H, hidden).T
                self.params["W2"][branch, slot] = orthogonal(H, H, hidden)
            self.params["W_pi"][slot] = orthogonal(H, A, 0.01)
            self.params["W_vf"][slot] = orthogonal(H, 1, 1.0)
            for k in ("b1", "b2"):
                self.params[k][:, slot] = 0.0
            for k in ("b_pi", "b_vf"):
                self.params[k][slot] = 0.0

    def parameters(self) -> list:
        return list(self.params.values())

    def task_view(self, slot: int, grads: bool = False) -> dict:
        """Views of one task's parameters (or gradients), named and shaped as in SB3's
        ActorCriticPolicy (weight (out, in), bias (out,))."""
        P = self.grads if grads else self.params
        return {"mlp_extractor.policy_net.0.weight": P["W1"][0, slot].T,
                "mlp_extractor.policy_net.0.bias": P["b1"][0, slot, 0],
                "mlp_extractor.policy_net.2.weight": P["W2"][0, slot],
                "mlp_extractor.policy_net.2.bias": P["b2"][0, slot, :, 0],
                "mlp_extractor.value_net.0.weight": P["W1"][1, slot].T,
                "mlp_extractor.value_net.0.bias": P["b1"][1, slot, 0],
                "mlp_extractor.value_net.2.weight": P["W2"][1, slot],
                "mlp_extractor.value_net.2.bias": P["b2"][1, slot, :, 0],
                "action_net.weight": P["W_pi"][slot], "action_net.bias": P["b_pi"][slot, :, 0],
                "value_net.weight": P["W_vf"][slot], "value_net.bias": P["b_vf"][slot, :, 0]}

    # -- forward / backward
    def _buffers_for(self, m: int) -> dict:
        """Activation and gradient buffers for minibatches of m rows, reused every call."""
        if m not in self._buffers:
            G, D, H = 2 * self.n, self.obs_dim, HIDDEN
            new = lambda *s: torch.empty(*s, device=self.device)  # noqa: E731
            self._buffers[m] = {"x": new(G, m, D), "h1": new(G, m, H), "h2": new(G, H, m),
                                "g2": new(G, H, m), "g1": new(G, m, H),
                                # rows of W1 (as one (G * D, H) table) of each network's copy of each observation
                                "rows": torch.arange(G, device=self.device).view(2, self.n, 1, 1) * D}
        return self._buffers[m]

    def forward(self, hot: torch.Tensor):
        """hot: the encoded observations (n_tasks, m, k): int64, where the k ones of each
        one-hot observation are (ObsEncoder), or float, the observation itself (BoxEncoder)
        -> logits (n_tasks, A, m) (feature-major, like the activations) and values (n_tasks, m)."""
        B, m, k = hot.shape
        G, P, buf = 2 * B, self.P, self._buffers_for(m)
        h1 = buf["h1"]  # (G, m, H), row-major
        if hot.is_floating_point():  # both branches see the same x
            buf["x"].view(2, B, m, k).copy_(hot.unsqueeze(0).expand(2, B, m, k))
            torch.baddbmm(P["b1"], buf["x"], P["W1"], out=h1)
        else:  # a one-hot input: sum the rows of W1 where the ones are (rows of the (G * D, H) table)
            buf["index"] = (hot.unsqueeze(0) + buf["rows"]).view(G * m, k)
            h1.view(G * m, HIDDEN).copy_(torch.nn.functional.embedding_bag(
                buf["index"], P["W1"].view(-1, HIDDEN), mode="sum"))
            h1.add_(P["b1"])
        _tanh_(h1)
        _linear_tanh(P["b2"], P["W2"], h1.transpose(1, 2), out=buf["h2"])
        h2 = buf["h2"].view(2, B, HIDDEN, m)
        logits = torch.baddbmm(P["b_pi"], P["W_pi"], h2[0])  # (B, A, m)
        values = torch.baddbmm(P["b_vf"], P["W_vf"], h2[1])  # (B, 1, m)
        return logits, values[:, 0]

    def backward(self, g_logits: torch.Tensor, g_values: torch.Tensor):
        """Parameter gradients (overwritten, not accumulated) for the last forward's inputs;
        g_logits (n_tasks, A, m) and g_values (n_tasks, m) are dLoss/dlogits, dLoss/dvalues."""
        B, m = g_values.shape
        P, Gr, buf = self.P, self.Gr, self._buffers_for(m)
        h2, g2 = buf["h2"].view(2, B, HIDDEN, m), buf["g2"].view(2, B, HIDDEN, m)
        g_values = g_values.unsqueeze(1)  # (B, 1, m), feature-major like g_logits
        # heads
        torch.bmm(g_logits, h2[0].transpose(1, 2), out=Gr["W_pi"])
        torch.sum(g_logits, 2, keepdim=True, out=Gr["b_pi"])
        torch.bmm(g_values, h2[1].transpose(1, 2), out=Gr["W_vf"])
        torch.sum(g_values, 2, keepdim=True, out=Gr["b_vf"])
        # second trunk layer (the value head has one output: its input gradient is an outer product)
        torch.bmm(P["W_pi"].transpose(1, 2), g_logits, out=g2[0])
        torch.mul(P["W_vf"].transpose(1, 2), g_values, out=g2[1])
        _tanh_backward_(buf["g2"], buf["h2"])
        torch.bmm(buf["g2"], buf["h1"], out=Gr["W2"])
        torch.sum(buf["g2"], 2, keepdim=True, out=Gr["b2"])
        # first trunk layer, row-major (no gradient w.r.t. the input)
        torch.bmm(buf["g2"].transpose(1, 2), P["W2"], out=buf["g1"])
        _tanh_backward_(buf["g1"], buf["h1"])
        torch.sum(buf["g1"], 1, keepdim=True, out=Gr["b1"])
        if "index" in buf:  # one-hot input: each row of g1 goes to the k rows of W1 its input selected
            table, g1 = Gr["W1"].view(-1, HIDDEN).zero_(), buf["g1"].view(-1, HIDDEN)
            for j in range(buf["index"].shape[1]):
                table.index_add_(0, buf["index"][:, j], g1)
        else:
            torch.bmm(buf["x"].transpose(1, 2), buf["g1"], out=Gr["W1"])

    # -- per-task gradient clipping
    def grad_norms(self) -> torch.Tensor:
        """(n_tasks,) L2 norm of each task's whole gradient."""
        trunk_rows, head_rows = self._grad_rows
        trunk = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in trunk_rows])
        heads = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in head_rows])
        # trunk rows are (layer, branch, task): fold layers and branches into each task
        return (trunk.square().view(-1, self.n).sum(0) + heads.square().sum(0)).sqrt()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale each task's gradient by min(1, max_norm / (its norm + 1e-6)), as clip_grad_norm_."""
        norms = self.grad_norms()
        coef = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(list(self.grads.values()), self._broadcast(coef))
        return norms

    def _broadcast(self, per_task: torch.Tensor) -> list:
        """A per-task value shaped to broadcast against each gradient tensor."""
        return [per_task.view(1, -1, 1, 1) if k in TRUNK else per_task.view(-1, 1, 1) for k in self.grads]


class BatchedAdam:
    """Adam over the batched tensors. Every statistic is elementwise and all tasks step
    together (so bias corrections agree): this is one independent Adam per task.

    It calls torch's fused Adam kernel (`torch._fused_adam_`, what
    `torch.optim.Adam(fused=True)` runs) directly: the optimizer's Python bookkeeping
    costs ~0.5 ms per update, 5% of an 81-task update on CPU. Where that kernel is
    missing it falls back to `torch.optim.Adam`; both match SB3's Adam (betas 0.9,
    0.999, eps 1e-5, no weight decay).
    """

    def __init__(self, params: list, lr: float):
        self.params, self.lr = params, lr
        self.grads = [p.grad for p in params]
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.step_count = torch.zeros((), device=params[0].device)  # shared: all step together
        self.fallback = None
        if not hasattr(torch, "_fused_adam_"):
            self.fallback = torch.optim.Adam(params, lr=lr, eps=ADAM_EPS)

    def step(self):
        if self.fallback is not None:
            return self.fallback.step()
        self.step_count.add_(1)
        torch._fused_adam_(self.params, self.grads, self.exp_avg, self.exp_avg_sq, [],
                           [self.step_count] * len(self.params),
                           lr=self.lr, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=ADAM_EPS,
                           amsgrad=False, maximize=False)


# ----------------------------------------------------------------------------- PPO loss

def ppo_loss_gradients(logits, values, actions, old_log_prob, advantages, returns, cfg):
    """Gradients of SB3's PPO loss w.r.t. logits and values, per task.

    logits are (n_tasks, A, m) (the action dim first: log_softmax is ~10x faster over a
    non-last dim of a tensor this small), the rest (n_tasks, m). Each task's loss is a
    mean over its own m rows: L = -mean(min(A r, A clip(r))) - ent_coef * mean(H) +
    vf_coef * mean((R - V)^2), with `advantages` already normalised per task and
    minibatch (`normalize_advantages`). Returns (g_logits (n_tasks, A, m), g_values (n_tasks, m)).
    """
    m = values.shape[1]
    log_p = torch.log_softmax(logits, 1)
    p = log_p.exp()
    a = actions.unsqueeze(1)
    log_prob = log_p.gather(1, a).squeeze(1)
    ratio = torch.exp(log_prob - old_log_prob)
    surr = advantages * ratio
    clipped = advantages * ratio.clamp(1 - cfg["clip_range"], 1 + cfg["clip_range"])
    # d min(surr, clipped) / d log_prob: surr where the unclipped term is the minimum
    # (on ties torch splits the gradient, but then both terms have derivative surr); 0
    # where the clipped one is smaller, which only happens outside the clip range
    g_log_prob = torch.where(surr <= clipped, surr, 0.0).mul_(-1.0 / m).unsqueeze(1)
    # d log_prob / d logits = onehot(a) - p
    g_logits = (p * -g_log_prob).scatter_add_(1, a, g_log_prob)
    if cfg["ent_coef"]:
        # dH/dlogits = -p (log p + H) for H = -sum p log p
        entropy = -(p * log_p).sum(1, keepdim=True)
        g_logits.add_(p * (log_p + entropy), alpha=cfg["ent_coef"] / m)
    g_values = (values - returns).mul_(2.0 * cfg["vf_coef"] / m)
    return g_logits, g_values


def normalize_advantages(advantages: torch.Tensor, batch_size: int) -> torch.Tensor:
    """SB3's per-minibatch normalisation, for every minibatch of an epoch at once:
    (n_tasks, n) in shuffled order -> each consecutive batch_size block of each task
    to mean 0, unbiased std 1 (+1e-8); minibatches of one row are left alone, as in SB3."""
    if batch_size == 1:
        return advantages
    blocks = advantages.view(advantages.shape[0], -1, batch_size)
    blocks = (blocks - blocks.mean(-1, keepdim=True)) / (blocks.std(-1, keepdim=True) + 1e-8)
    return blocks.view_as(advantages)


def ppo_loss(logits, values, actions, old_log_prob, advantages, returns, cfg) -> torch.Tensor:
    """(n_tasks,) SB3's PPO loss per task, written with autograd ops (tests and debugging);
    arguments as in ppo_loss_gradients."""
    log_p = torch.log_softmax(logits, 1)
    log_prob = log_p.gather(1, actions.unsqueeze(1)).squeeze(1)
    ratio = torch.exp(log_prob - old_log_prob)
    policy_loss = -torch.min(advantages * ratio,
                             advantages * ratio.clamp(1 - cfg["clip_range"], 1 + cfg["clip_range"])).mean(1)
    entropy = -(log_p.exp() * log_p).sum(1)
    value_loss = ((returns - values) ** 2).mean(1)
    return policy_loss - cfg["ent_coef"] * entropy.mean(1) + cfg["vf_coef"] * value_loss
