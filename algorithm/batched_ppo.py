"""Batched backend: one independent PPO learner per task, many tasks computed together.

Every task gets its own Stable-Baselines3-style `MlpPolicy` network, its own Adam state,
its own random stream and its own `n_stream` environment copies; the tasks are only
*computed* together. Each layer is one weight tensor with a leading network dimension
(`torch.bmm`), and the numpy batched env steps tasks x streams copies at once, so one
PPO minibatch update for 81 tasks is a few dozen large tensor ops instead of 81 x that
many small ones. Nothing is reduced over the task dimension: advantage normalisation,
losses, gradient-norm clipping and Adam are all per task, so no information passes
between tasks.

What follows SB3 PPO (2.x) exactly:
- observations: each MultiDiscrete dimension one-hot encoded and concatenated
  (the family's MultiDiscrete space: darkroom [g, g], key-to-door [g, g, 2]), or a Box
  observation as its floats, unscaled (the point robot), as `preprocess_obs` does;
- network: separate policy and value MLPs, 64-64 tanh each, a linear action head
  (logits of a categorical) and a linear value head; orthogonal init with gain sqrt(2)
  for hidden layers, 0.01 for the action head, 1 for the value head, zero biases;
- rollout: `n_steps` per stream, values and log-probabilities from the policy that
  acts; at a timeout (our episodes only ever end by truncation at the horizon)
  gamma * V(true last state) is added to the reward, as SB3 does for
  `TimeLimit.truncated`; GAE(gamma, lambda) with the same recursion and
  returns = advantages + values;
- update: `n_epochs` passes over a fresh random permutation of the rollout, minibatches
  of `batch_size`, advantages normalised per minibatch (mean, unbiased std, +1e-8;
  skipped for a minibatch of one), clipped surrogate, value loss MSE(returns, values)
  with no value clipping, entropy bonus `-ent_coef * mean(entropy)`, loss weights
  `vf_coef`, gradient norm clipped to `max_grad_norm` as `clip_grad_norm_` does
  (coefficient max_norm / (norm + 1e-6), capped at 1), Adam(eps=1e-5) at the constant
  `source_lr`;
- recorded history: the same arrays as `HistoryLoggerCallback` (states the action was
  taken in, actions, raw rewards before bootstrapping, the true next state also on the
  last step of an episode, dones, compress_markers), with the dtypes of the file.

Differences from SB3 (none changes what PPO computes, only how):
- gradients are computed by hand (the network and loss are fixed, so the backward pass
  is a few batched matmuls), not by autograd; `tests/test_batched_ppo.py` checks them
  against autograd through SB3's own policy.
- on CPU, tanh is evaluated as 2 * sigmoid(2x) - 1 (within 2e-7 of torch.tanh): torch's
  CPU tanh is ~3x slower than its sigmoid, and tanh is a large share of an update.
  CUDA uses torch.tanh.
- random numbers: each task draws from its own `torch.Generator` seeded with
  `task_seed(alg_seed, index)` (SB3 seeds its global torch/numpy streams with the same
  number): init, then per rollout one uniform per (step, stream) for the actions
  (sampled by inverse CDF instead of `torch.multinomial`), then per epoch one `randperm`
  (SB3: `np.random.permutation`). Same distributions, other draws: a history is not
  bit-identical to SB3's with the same seed, only statistically equivalent
  (`test_batched_follows_sb3_on_darkroom`, marked slow).
- Adam is torch's fused kernel over the batched tensors (elementwise, so one Adam per
  task up to floating-point rounding).
- no update after the last rollout: it could not change the recorded history (SB3 runs
  it and throws the model away).
- no per-update logging (losses, KL, clip fraction) and no `target_kl` early stopping
  (off in SB3 by default, and not a config key here).

Parallelism: on CPU a chunk of tasks is split over `n_process` worker processes, each
single-threaded (see `train_chunk` for why not threads); on CUDA one process runs the
chunk on the GPU.

Chunk independence: a task's history does not depend on which other tasks share its
chunk or its worker, because every random draw comes from the task's own generator
and every reduction runs over that task's slice only. Bit-for-bit equality also needs
the batched kernels to compute each matrix of a batch the same way whatever the batch
size; that holds for the CPU kernels here (`test_task_history_independent_of_chunk`,
`test_worker_processes_give_the_same_histories`), but torch does not promise it (cuBLAS
may pick other kernels for other batch sizes), so on CUDA a task's history can differ
in rounding, and after that in sampled actions, between chunk compositions. It is
always deterministic for a given chunk on CPU.

Memory: peak memory grows linearly with tasks x streams (x steps for the history). Per
task, the recorded history holds T x n_stream steps of 2 x state_dim x 4 + 8 bytes
(darkroom: 1040 x 100 x 24 B = 2.5 MB) and the rollout buffers n_steps x n_stream
samples of about 2 x ((state_dim + 1) x 8 + 24) bytes, the rollout and its shuffled copy
(darkroom: 8000 x 96 B = 0.8 MB); the network, Adam state and activations add ~0.3 MB.
With worker processes the histories of a chunk exist twice while they are sent back,
and each process carries ~0.3 GB of torch itself: the full darkroom run (81 tasks, 100
streams, 2 workers) peaked at 1.2 GB summed over all processes. `task_chunk` bounds how many tasks
are held at once; with task_chunk=0 (auto) a chunk is at most AUTO_CHUNK_TASKS tasks, and
cut to what fits in half of the available memory (the results do not depend on it, see
above), with a note on stderr.
"""
import math
import multiprocessing as mp
import sys
import traceback
from queue import Empty

import numpy as np
import torch

import env as envs
from algorithm.history import compress_markers, n_rollouts, steps_per_stream
from algorithm.sb3_ppo import task_seed
from utils import UserError, available_memory, exit_with_parent, pick_device

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
        B, D, H, A = n_tasks, obs_dim, HIDDEN, n_actions
        shapes = {"W1": (2, B, D, H), "b1": (2, B, 1, H), "W2": (2, B, H, H), "b2": (2, B, H, 1),
                  "W_pi": (B, A, H), "b_pi": (B, A, 1), "W_vf": (B, 1, H), "b_vf": (B, 1, 1)}
        self.params = {k: torch.zeros(s, device=device) for k, s in shapes.items()}
        self.grads = {k: torch.zeros(s, device=device) for k, s in shapes.items()}
        for k, p in self.params.items():
            p.grad = self.grads[k]
        # views made once (an update is short enough for Python overheads to matter): the
        # trunk as 2 x n_tasks matrices for bmm, each gradient as one row per network
        G = 2 * B
        self.P = {**self.params, **{k: self.params[k].view(G, *shapes[k][2:]) for k in TRUNK}}
        self.Gr = {**self.grads, **{k: self.grads[k].view(G, *shapes[k][2:]) for k in TRUNK}}
        self._grad_rows = ([self.grads[k].view(G, -1) for k in TRUNK], [self.grads[k].view(B, -1) for k in HEADS])
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


# ----------------------------------------------------------------------------- observations

class ObsEncoder:
    """SB3's MultiDiscrete preprocessing: one-hot per dimension, concatenated.

    The network is fed where the ones are (obs + offset of each dimension, k = len(nvec)
    indices per observation) and builds the one-hot input itself; rollout buffers then
    store k integers per sample instead of sum(nvec) floats.
    """

    def __init__(self, nvec, device):
        nvec = [int(n) for n in nvec]
        self.dim = sum(nvec)
        self.offsets = torch.tensor(np.cumsum([0] + nvec[:-1]), device=device)

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (..., len(nvec)) integer -> indices of the ones (..., len(nvec)) int64."""
        return obs.long() + self.offsets

    def one_hot(self, obs: torch.Tensor) -> torch.Tensor:
        """The float one-hot vector SB3 feeds its network (..., dim); for tests."""
        out = torch.zeros(*obs.shape[:-1], self.dim, device=obs.device)
        return out.scatter_(-1, self(obs), 1.0)


class BoxEncoder:
    """SB3's Box preprocessing: the observation as floats, unscaled (`preprocess_obs` only
    casts a non-image Box). Rollout buffers store the floats."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.float()


def observation_encoder(cfg: dict, device):
    """What the network reads of the family's observation space: the one-hot of each
    MultiDiscrete coordinate (ObsEncoder), or a Box's floats (BoxEncoder)."""
    nvec = envs.state_cardinalities(cfg)
    return BoxEncoder(envs.state_dim(cfg)) if nvec is None else ObsEncoder(nvec, device)


# ----------------------------------------------------------------------------- one chunk

class History:
    """The recorded arrays of a chunk, laid out (task, T, stream, ...) so that each task's
    arrays are contiguous slices in the layout of HistoryLoggerCallback."""

    def __init__(self, n_tasks: int, T: int, n_stream: int, state_dim: int):
        shape = (n_tasks, T, n_stream)
        self.states = np.zeros((*shape, state_dim), np.float32)
        self.next_states = np.zeros((*shape, state_dim), np.float32)
        self.actions = np.zeros(shape, np.int16)
        self.rewards = np.zeros(shape, np.float32)
        self.dones = np.zeros(shape, bool)

    def record(self, t: int, states, actions, rewards, next_states, dones):
        """One env step; all arguments are (n_tasks * n_stream, ...), task-major."""
        n = self.states.shape[0]
        self.states[:, t] = states.reshape(n, -1, states.shape[-1])
        self.actions[:, t] = actions.reshape(n, -1)
        self.rewards[:, t] = rewards.reshape(n, -1)
        self.next_states[:, t] = next_states.reshape(n, -1, next_states.shape[-1])
        self.dones[:, t] = dones.reshape(n, -1)

    def task(self, slot: int, n_steps: int) -> dict:
        T, S = self.actions.shape[1:]
        return {"states": self.states[slot], "actions": self.actions[slot], "rewards": self.rewards[slot],
                "next_states": self.next_states[slot], "dones": self.dones[slot],
                "compress_markers": compress_markers(T, n_steps, S)}


def _gae(rewards, values, dones, last_values, gamma, lam):
    """SB3's GAE over a rollout; all (n_steps, ...), `dones[t]` ends the episode after step t."""
    advantages = torch.empty_like(rewards)
    last = torch.zeros_like(last_values)
    next_values = last_values
    for t in reversed(range(len(rewards))):
        non_terminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_values * non_terminal - values[t]
        last = delta + gamma * lam * non_terminal * last
        advantages[t] = last
        next_values = values[t]
    return advantages, advantages + values


def _sample(logits: torch.Tensor, uniforms: torch.Tensor):
    """Categorical sample by inverse CDF: logits (B, A, m), uniforms (B, m) -> actions
    (B, m) and their log-probabilities."""
    log_p = torch.log_softmax(logits, 1)
    cdf = log_p.exp().cumsum(1)
    actions = (uniforms.unsqueeze(1) >= cdf).sum(1).clamp_(max=logits.shape[1] - 1)
    return actions, log_p.gather(1, actions.unsqueeze(1)).squeeze(1)


class ChunkLearner:
    """PPO on one chunk of tasks: the network, optimizer, env and per-task generators."""

    def __init__(self, cfg: dict, indices: list, tasks: list, device):
        self.cfg, self.device = cfg, device
        self.B, self.S = len(indices), cfg["n_stream"]
        copies = [tasks[i] for i in indices for _ in range(self.S)]
        self.env = envs.make_batched_env(cfg, copies, seed=cfg["alg_seed"])  # the seed: stochastic families
        self.encode = observation_encoder(cfg, device)
        self.net = BatchedActorCritic(self.B, self.encode.dim, envs.n_actions(cfg), device)
        self.generators = [torch.Generator().manual_seed(task_seed(cfg["alg_seed"], i)) for i in indices]
        for slot, g in enumerate(self.generators):
            self.net.init_task(slot, g)
        self.adam = BatchedAdam(self.net.parameters(), cfg["source_lr"])
        self.history = History(self.B, steps_per_stream(cfg), self.S, envs.state_dim(cfg))

    def _per_task(self, draw) -> torch.Tensor:
        """Stack one draw per task from the task's own generator (chunk-independent)."""
        return torch.stack([draw(g) for g in self.generators], 0).to(self.device)

    def _hot(self, obs: np.ndarray) -> torch.Tensor:
        """Env observations (B * S, state_dim) -> the network's input (B, S, k): one-hot indices or floats."""
        return self.encode(torch.as_tensor(obs, device=self.device).view(self.B, self.S, -1))

    @torch.no_grad()
    def rollout(self, obs: np.ndarray, t0: int):
        """n_steps in every stream; records history from step t0. Returns the next obs
        and the rollout as tensors shaped (B, n_steps * S, ...)."""
        n_steps, B, S, gamma = self.cfg["n_steps"], self.B, self.S, self.cfg["gamma"]
        uniforms = self._per_task(lambda g: torch.rand(n_steps, S, generator=g))  # (B, n_steps, S)
        keys = ("hot", "actions", "log_prob", "values", "rewards", "dones")
        buf = {k: [] for k in keys}
        for t in range(n_steps):
            hot = self._hot(obs)
            logits, values = self.net.forward(hot)
            actions, log_prob = _sample(logits, uniforms[:, t])
            actions_np = actions.cpu().numpy().reshape(-1)
            next_obs, rewards, dones = self.env.step(actions_np)
            self.history.record(t0 + t, obs, actions_np, rewards, next_obs, dones)
            rewards_t = torch.as_tensor(rewards, device=self.device).view(B, S)
            if dones.any():
                # every copy shares one clock, so all episodes end together, by truncation:
                # bootstrap with the value of the true last state, as SB3 does on timeouts
                assert dones.all(), "batched env copies must finish together"
                rewards_t = rewards_t + gamma * self.net.forward(self._hot(next_obs))[1]
                next_obs = self.env.reset()
            for k, v in zip(keys, (hot, actions, log_prob, values, rewards_t,
                                   torch.full((B, S), float(dones.any()), device=self.device))):
                buf[k].append(v)
            obs = next_obs
        last_values = self.net.forward(self._hot(obs))[1]
        data = {k: torch.stack(v, 0) for k, v in buf.items()}  # (n_steps, B, S, ...)
        adv, ret = _gae(data["rewards"], data["values"], data["dones"], last_values,
                        gamma, self.cfg["gae_lambda"])
        data.update(advantages=adv, returns=ret)
        # (n_steps, B, S, ...) -> (B, n_steps * S, ...): each task's samples in one row
        flat = {k: data[k].transpose(0, 1).reshape(B, n_steps * S, *data[k].shape[3:])
                for k in ("hot", "actions", "log_prob", "advantages", "returns")}
        return obs, flat

    def train(self, data: dict):
        """n_epochs over the rollout, minibatches of batch_size, per task."""
        cfg, n = self.cfg, data["actions"].shape[1]
        m = cfg["batch_size"]
        keys = ("hot", "actions", "log_prob", "advantages", "returns")
        for _ in range(cfg["n_epochs"]):
            perm = self._per_task(lambda g: torch.randperm(n, generator=g))  # (B, n)
            shuffled = {k: data[k].gather(1, perm.view(*perm.shape, *[1] * (data[k].dim() - 2))
                                          .expand_as(data[k])) for k in keys}
            shuffled["advantages"] = normalize_advantages(shuffled["advantages"], m)
            # per-minibatch views made once per epoch: the update loop is the hot path
            for mb in zip(*(shuffled[k].split(m, dim=1) for k in keys)):
                hot, actions, old_log_prob, advantages, returns = mb
                logits, values = self.net.forward(hot)
                self.net.backward(*ppo_loss_gradients(logits, values, actions, old_log_prob,
                                                      advantages, returns, cfg))
                self.net.clip_grad_norm_(cfg["max_grad_norm"])
                self.adam.step()

    def run(self, progress=None):
        """All rollouts and updates; `progress(0, n_env_steps)` after every rollout and its update."""
        n_steps, R = self.cfg["n_steps"], n_rollouts(self.cfg)
        obs = self.env.reset()
        for r in range(R):
            obs, data = self.rollout(obs, r * n_steps)
            if r < R - 1:  # an update after the last rollout could not change the history
                self.train(data)
            del data
            if progress is not None:  # after the update, so that the rate (and the ETA) include it
                progress(0, self.B * self.S * n_steps)

    def histories(self, indices: list[int]) -> dict:
        return {index: self.history.task(slot, self.cfg["n_steps"]) for slot, index in enumerate(indices)}


# ----------------------------------------------------------------------------- entry point

def bytes_per_task(cfg: dict, obs_dim: int) -> int:
    """Rough peak memory per task (see module docstring)."""
    ds = envs.state_dim(cfg)
    # states, next_states float32; actions int16; rewards float32; dones, markers 1 byte;
    # twice: worker processes send a copy back
    history = 2 * steps_per_stream(cfg) * cfg["n_stream"] * (2 * ds * 4 + 2 + 4 + 1 + 1)
    # per sample: ds one-hot indices and an action (int64), 6 float32 fields, twice
    # (the rollout and its shuffled copy)
    rollout = cfg["n_steps"] * cfg["n_stream"] * 2 * ((ds + 1) * 8 + 6 * 4)
    # forward/backward buffers for minibatches and for rollout steps, both branches
    activations = 2 * (obs_dim + 4 * HIDDEN) * (cfg["batch_size"] + cfg["n_stream"]) * 4
    return history + rollout + activations


# task_chunk=0 trains at most this many tasks per chunk: a chunk's histories reach the
# disk only when it ends, so one chunk of 650 Dark Key-to-Door 9x9 tasks kept 31 minutes
# of work (2 cores) at risk; 256 tasks (128 per worker) keep the per-update overhead
# that smaller chunks pay (~0.5 ms per minibatch update per worker, whatever its size)
# near 4% of an update.
AUTO_CHUNK_TASKS = 256


def chunk_size(cfg: dict, n_tasks: int, obs_dim: int, device) -> int:
    if cfg["task_chunk"]:
        return min(cfg["task_chunk"], n_tasks)
    fits = max(1, available_memory(device) // 2 // bytes_per_task(cfg, obs_dim))
    if fits < min(n_tasks, AUTO_CHUNK_TASKS):
        print(f"batched PPO: {n_tasks} tasks do not fit in memory at once; training {fits} at a time "
              "(set task_chunk to choose; results do not depend on it)", file=sys.stderr)
    return min(fits, n_tasks, AUTO_CHUNK_TASKS)


def n_workers(cfg: dict, device) -> int:
    """Worker processes: n_process on CPU (each single-threaded), one process on CUDA."""
    return 1 if device.type == "cuda" else cfg["n_process"]


def train_chunk(cfg: dict, chunk: list[int], tasks: list[dict], device, progress=None) -> dict:
    """Train one chunk of tasks; returns {index: history}.

    On CPU the chunk is split over `n_process` worker processes, each a single-threaded
    learner for its share of the tasks. Measured on 2 cores (2 rollouts of 81 darkroom
    tasks): one single-threaded process 48 s, two worker processes 22 s, two threads in
    one process 48 s (no gain); torch's own intra-op threads were several times slower
    than one thread whenever other processes kept a core busy (threads wait at each op's
    barrier), and the per-update Python and dispatch work (~1 ms) stays serial with
    them. Results do not depend on the split (chunk independence).
    """
    workers = min(n_workers(cfg, device), len(chunk))
    if workers == 1:
        learner = ChunkLearner(cfg, chunk, tasks, device)
        learner.run(progress)
        return learner.histories(chunk)
    groups = [[int(i) for i in g] for g in np.array_split(chunk, workers)]
    ctx = mp.get_context("spawn")  # fork is unsafe once torch has started threads
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg, g, tasks, queue), daemon=True) for g in groups]
    for proc in procs:
        proc.start()
    try:
        return _gather(queue, procs, progress)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()


def _worker(cfg: dict, chunk: list[int], tasks: list[dict], queue):
    """A worker process: train its tasks, report env steps, send the histories back."""
    exit_with_parent()
    try:
        torch.set_num_threads(1)
        learner = ChunkLearner(cfg, chunk, tasks, torch.device("cpu"))
        learner.run(lambda n_tasks, n_steps: queue.put(("steps", n_steps)))
        queue.put(("done", learner.histories(chunk)))
    except KeyboardInterrupt:
        pass  # the main process handles Ctrl-C
    except BaseException:
        queue.put(("error", traceback.format_exc()))


def _gather(queue, procs, progress) -> dict:
    """Forward progress and collect results until every worker is done; raise if one fails."""
    results, pending = {}, len(procs)
    while pending:
        try:
            kind, payload = queue.get(timeout=1.0)
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise UserError(f"a batched PPO worker process died (exit code {dead[0]}; out of memory? "
                                "try a smaller task_chunk); finished tasks are saved, rerun to go on") from None
            continue
        if kind == "steps" and progress is not None:
            progress(0, payload)
        elif kind == "done":
            results.update(payload)
            pending -= 1
        elif kind == "error":
            raise RuntimeError(f"a batched PPO worker process failed:\n{payload}")
    return results


def collect(cfg: dict, indices: list[int], tasks: list[dict], on_done, progress=None):
    """Train one PPO learner per task index, `task_chunk` tasks at a time; after each chunk
    hand its histories to `on_done({index: history})` and call `progress(n_tasks, 0)`
    (env steps are reported with `progress(0, n)` after every rollout)."""
    device = pick_device(cfg["device"])
    obs_dim = observation_encoder(cfg, "cpu").dim
    size = chunk_size(cfg, len(indices), obs_dim, device)
    for start in range(0, len(indices), size):
        chunk = indices[start:start + size]
        on_done(train_chunk(cfg, chunk, tasks, device, progress))
        if progress is not None:
            progress(len(chunk), 0)
