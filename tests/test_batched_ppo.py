"""The batched PPO backend: SB3 semantics, per-task independence, history format, collect.py."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import env as envs
from algorithm import batched_net, batched_ppo, history
from algorithm.batched_net import BatchedActorCritic, BatchedAdam, normalize_advantages, ppo_loss, ppo_loss_gradients
from algorithm.batched_ppo import ObsEncoder
from algorithm.source import task_seed
from cli import load_config

ROOT = Path(__file__).resolve().parents[1]
DARKROOM = [ROOT / "config/algorithm/ppo_darkroom.yaml", ROOT / "config/env/darkroom.yaml"]
KEY_TO_DOOR = [ROOT / "config/algorithm/ppo_dark_key_to_door.yaml", ROOT / "config/env/dark_key_to_door_9x9_all.yaml"]


def small_cfg(**overrides):
    """5x5 darkroom, 4 streams, 3 rollouts of 20 steps, 2 epochs: a few hundred updates."""
    base = dict(grid_size=5, horizon=10, n_stream=4, n_steps=20, batch_size=20, n_epochs=2,
                total_source_timesteps=3 * 20 * 4, device="cpu", n_process=1)
    return load_config(DARKROOM, {**base, **overrides})


def run_collect(cfg, indices):
    out = {}
    batched_ppo.collect(cfg, indices, envs.task_list(cfg), out.update)
    return out


# ----------------------------------------------------------------------------- SB3 semantics

def sb3_policies(cfg, n):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv
    tasks = envs.task_list(cfg)
    return [PPO("MlpPolicy", DummyVecEnv([lambda: envs.make_gym_env(cfg, tasks[i])]), n_steps=8, batch_size=8,
                seed=i, device="cpu").policy for i in range(n)]


def copy_sb3_into(net, policies):
    with torch.no_grad():
        for slot, policy in enumerate(policies):
            for name, view in net.task_view(slot).items():
                view.copy_(policy.state_dict()[name])


def random_minibatch(cfg, n_tasks, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, cfg["grid_size"], (n_tasks, m, 2), generator=g)
    return dict(obs=obs, actions=torch.randint(0, 5, (n_tasks, m), generator=g),
                old_log_prob=-1.6 + 0.3 * torch.randn(n_tasks, m, generator=g),
                advantages=torch.randn(n_tasks, m, generator=g), returns=torch.randn(n_tasks, m, generator=g))


def sb3_loss(policy, obs, actions, old_log_prob, advantages, returns, cfg):
    """The loss of SB3's PPO.train for one minibatch, with SB3's own policy."""
    values, log_prob, entropy = policy.evaluate_actions(obs, actions)
    values = values.flatten()
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    ratio = torch.exp(log_prob - old_log_prob)
    policy_loss = -torch.min(advantages * ratio,
                             advantages * torch.clamp(ratio, 1 - cfg["clip_range"], 1 + cfg["clip_range"])).mean()
    value_loss = torch.nn.functional.mse_loss(returns, values)
    return policy_loss + cfg["ent_coef"] * -torch.mean(entropy) + cfg["vf_coef"] * value_loss


@pytest.mark.parametrize("ent_coef", [0.0, 0.01])
def test_forward_and_gradients_match_sb3_policy(ent_coef):
    cfg = small_cfg(ent_coef=ent_coef)
    n_tasks, m = 3, 12
    policies = sb3_policies(cfg, n_tasks)
    encoder = ObsEncoder([cfg["grid_size"]] * 2, "cpu")
    net = BatchedActorCritic(n_tasks, encoder.dim, 5, "cpu")
    copy_sb3_into(net, policies)
    mb = random_minibatch(cfg, n_tasks, m)
    # make some ratios leave the clip range so that both branches of the min are tested
    mb["old_log_prob"][:, :4] += torch.tensor([1.0, -1.0, 0.5, -0.5])
    logits, values = net.forward(encoder(mb["obs"]))
    g_logits, g_values = ppo_loss_gradients(logits, values, mb["actions"], mb["old_log_prob"],
                                            normalize_advantages(mb["advantages"], m), mb["returns"], cfg)
    net.backward(g_logits, g_values)
    for slot, policy in enumerate(policies):
        obs = mb["obs"][slot]
        dist = policy.get_distribution(obs)
        torch.testing.assert_close(torch.log_softmax(logits[slot], 0).T, dist.distribution.logits,
                                   atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(values[slot], policy.predict_values(obs).flatten(), atol=2e-6, rtol=1e-5)
        policy.optimizer.zero_grad()
        sb3_loss(policy, obs, mb["actions"][slot], mb["old_log_prob"][slot], mb["advantages"][slot],
                 mb["returns"][slot], cfg).backward()
        for name, grad in net.task_view(slot, grads=True).items():
            torch.testing.assert_close(grad, dict(policy.named_parameters())[name].grad, atol=2e-6, rtol=1e-4,
                                       msg=lambda s: f"task {slot} {name}: {s}")


def test_manual_gradients_match_autograd_of_batched_loss():
    cfg = small_cfg(ent_coef=0.05)
    n_tasks, m = 4, 10
    encoder = ObsEncoder([cfg["grid_size"]] * 2, "cpu")
    net = BatchedActorCritic(n_tasks, encoder.dim, 5, "cpu")
    for slot in range(n_tasks):
        net.init_task(slot, torch.Generator().manual_seed(slot))
    mb = random_minibatch(cfg, n_tasks, m, seed=1)
    hot = encoder(mb["obs"])
    logits, values = net.forward(hot)
    advantages = normalize_advantages(mb["advantages"], m)
    net.backward(*ppo_loss_gradients(logits, values, mb["actions"], mb["old_log_prob"], advantages,
                                     mb["returns"], cfg))
    # the same function with autograd, through a plain per-task implementation of the network
    params = {k: p.clone().requires_grad_() for k, p in net.params.items()}
    x = encoder.one_hot(mb["obs"]).transpose(1, 2)  # (B, D, m)
    # (the first layer is stored input-major: W1 (in, out), b1 (1, out))
    h = [torch.tanh(params["W2"][b] @ torch.tanh(params["W1"][b].mT @ x + params["b1"][b].mT) + params["b2"][b])
         for b in (0, 1)]
    ref_logits = params["W_pi"] @ h[0] + params["b_pi"]
    ref_values = (params["W_vf"] @ h[1] + params["b_vf"])[:, 0]
    ppo_loss(ref_logits, ref_values, mb["actions"], mb["old_log_prob"], advantages, mb["returns"],
             cfg).sum().backward()
    for k, p in params.items():
        torch.testing.assert_close(net.grads[k], p.grad, atol=2e-6, rtol=1e-4, msg=lambda s: f"{k}: {s}")


def test_init_is_sb3_orthogonal_init():
    net = BatchedActorCritic(2, 18, 5, "cpu")
    for slot in range(2):
        net.init_task(slot, torch.Generator().manual_seed(slot))
    gains = {"mlp_extractor.policy_net.0.weight": 2 ** 0.5, "mlp_extractor.policy_net.2.weight": 2 ** 0.5,
             "mlp_extractor.value_net.0.weight": 2 ** 0.5, "mlp_extractor.value_net.2.weight": 2 ** 0.5,
             "action_net.weight": 0.01, "value_net.weight": 1.0}
    views = net.task_view(1)
    for name, gain in gains.items():
        singular_values = torch.linalg.svdvals(views[name])
        torch.testing.assert_close(singular_values, torch.full_like(singular_values, gain), msg=name)
    for name, v in views.items():
        if name.endswith("bias"):
            assert (v == 0).all(), name
    assert not torch.equal(net.task_view(0)["action_net.weight"], views["action_net.weight"])


def test_gradient_clipping_is_per_task():
    """Each task's gradient is clipped by its own norm, exactly as clip_grad_norm_ on its own."""
    net = BatchedActorCritic(3, 18, 5, "cpu")
    g = torch.Generator().manual_seed(0)
    for slot, scale in enumerate([100.0, 0.001, 3.0]):  # norms ~1000, ~0.1, ~30
        for v in net.task_view(slot, grads=True).values():
            v.copy_(scale * torch.randn(v.shape, generator=g))
    before = [[v.clone() for v in net.task_view(slot, grads=True).values()] for slot in range(3)]
    norms = net.clip_grad_norm_(0.5)
    for slot in range(3):
        expected = [torch.zeros_like(v, requires_grad=True) for v in before[slot]]
        for e, v in zip(expected, before[slot]):
            e.grad = v.clone()
        norm = torch.nn.utils.clip_grad_norm_(expected, 0.5)
        torch.testing.assert_close(norms[slot], norm)
        for got, e in zip(net.task_view(slot, grads=True).values(), expected):
            torch.testing.assert_close(got, e.grad)
    assert torch.equal(torch.cat([v.flatten() for v in net.task_view(1, grads=True).values()]),
                       torch.cat([v.flatten() for v in before[1]]))  # below max_norm: untouched


def test_an_update_changes_only_the_task_it_is_for():
    """A gradient in one task's slot moves only that task's parameters (per-task Adam)."""
    net = BatchedActorCritic(3, 18, 5, "cpu")
    for slot in range(3):
        net.init_task(slot, torch.Generator().manual_seed(slot))
    adam = BatchedAdam(net.parameters(), 1e-2)
    before = [{k: v.clone() for k, v in net.task_view(slot).items()} for slot in range(3)]
    for grad in net.grads.values():
        grad.zero_()
    for v in net.task_view(1, grads=True).values():
        v.fill_(1.0)
    net.clip_grad_norm_(0.5)
    adam.step()
    for slot in range(3):
        changed = any(not torch.equal(v, before[slot][k]) for k, v in net.task_view(slot).items())
        assert changed == (slot == 1), slot


def test_batched_adam_is_one_torch_adam_per_task():
    net = BatchedActorCritic(3, 18, 5, "cpu")
    for slot in range(3):
        net.init_task(slot, torch.Generator().manual_seed(slot))
    adam = BatchedAdam(net.parameters(), 3e-4)
    reference = [[v.clone().requires_grad_() for v in net.task_view(slot).values()] for slot in range(3)]
    optims = [torch.optim.Adam(ps, lr=3e-4, eps=1e-5) for ps in reference]  # SB3's optimizer
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for slot in range(3):
            for v, r in zip(net.task_view(slot, grads=True).values(), reference[slot]):
                v.copy_(torch.randn(v.shape, generator=g) * (slot + 1))
                r.grad = v.clone()
        adam.step()
        for o in optims:
            o.step()
    for slot in range(3):
        for v, r in zip(net.task_view(slot).values(), reference[slot]):
            torch.testing.assert_close(v, r.detach(), rtol=1e-5, atol=1e-7)


def test_advantages_are_normalised_per_task_and_minibatch():
    adv = torch.randn(3, 12) * torch.tensor([[1.0], [10.0], [100.0]]) + 5
    out = normalize_advantages(adv.clone(), 4)
    for b in range(3):
        for block in range(3):
            a = adv[b, 4 * block:4 * block + 4]
            torch.testing.assert_close(out[b, 4 * block:4 * block + 4], (a - a.mean()) / (a.std() + 1e-8))
    assert torch.equal(normalize_advantages(adv, 1), adv)  # SB3 skips minibatches of one


def test_gae_matches_sb3_rollout_buffer():
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer
    n_steps, n_envs, gamma, lam = 7, 3, 0.9, 0.8
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.rand(n_steps, n_envs, generator=g), torch.randn(n_steps, n_envs, generator=g)
    dones = (torch.rand(n_steps, n_envs, generator=g) < 0.3).float()  # dones[t]: episode ends after step t
    last_values = torch.randn(n_envs, generator=g)
    buffer = RolloutBuffer(n_steps, spaces.MultiDiscrete([3, 3]), spaces.Discrete(5), device="cpu",
                           gamma=gamma, gae_lambda=lam, n_envs=n_envs)
    buffer.rewards[:] = rewards.numpy()
    buffer.values[:] = values.numpy()
    buffer.episode_starts[1:] = dones[:-1].numpy()  # SB3 stores "this step starts an episode"
    buffer.compute_returns_and_advantage(last_values, dones[-1].numpy())
    advantages, returns = batched_ppo._gae(rewards, values, dones, last_values, gamma, lam)
    np.testing.assert_allclose(advantages.numpy(), buffer.advantages, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns.numpy(), buffer.returns, rtol=1e-5, atol=1e-6)


def test_timeouts_bootstrap_with_the_value_of_the_true_last_state():
    """At an episode's last step the return is r + gamma * V(true next state), as SB3 does
    on TimeLimit.truncated: the episode is cut by the horizon, not terminated."""
    cfg = small_cfg(gamma=0.9)
    learner = batched_ppo.ChunkLearner(cfg, [3, 6], envs.task_list(cfg), torch.device("cpu"))
    _, data = learner.rollout(learner.env.reset(), 0)
    n_steps, S = cfg["n_steps"], cfg["n_stream"]
    h = learner.history
    for slot in range(2):
        for t in range(cfg["horizon"] - 1, n_steps, cfg["horizon"]):  # the episode ends
            next_states = torch.as_tensor(h.next_states[slot, t]).long()  # (S, 2)
            hot = learner.encode(next_states).expand(2, S, 2)  # both tasks' nets, take this slot's
            v_next = learner.net.forward(hot)[1][slot]
            got = data["returns"][slot, t * S:(t + 1) * S]
            expected = torch.as_tensor(h.rewards[slot, t]) + cfg["gamma"] * v_next
            torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- histories

def test_history_shapes_dtypes_and_markers():
    cfg = small_cfg()
    out = run_collect(cfg, [0, 7])
    T, S = history.steps_per_stream(cfg), cfg["n_stream"]
    assert sorted(out) == [0, 7]
    for h in out.values():
        history.check_history(h, cfg, state_dim=2)
        assert h["states"].dtype == np.float32 and h["next_states"].dtype == np.float32
        assert h["rewards"].dtype == np.float32 and h["dones"].dtype == bool
        np.testing.assert_array_equal(h["compress_markers"], history.compress_markers(T, cfg["n_steps"], S))
        assert set(np.unique(h["actions"])) <= set(range(5))
        # episodes end every horizon steps, in every stream
        np.testing.assert_array_equal(h["dones"], (np.arange(1, T + 1) % cfg["horizon"] == 0)[:, None].repeat(S, 1))


def test_next_states_are_true_next_states_also_at_episode_ends():
    cfg = small_cfg()
    h = run_collect(cfg, [3])[3]
    start = envs.darkroom.start_position(cfg["grid_size"])
    ends = h["dones"]
    # within an episode the next state is the following state; after an end comes a reset
    np.testing.assert_array_equal(h["next_states"][:-1][~ends[:-1]], h["states"][1:][~ends[:-1]])
    assert (h["states"][1:][ends[:-1]] == start).all()
    assert (h["states"][0] == start).all()
    # the last step's next state is a real move from the last state, not the reset state
    moves = h["next_states"] - h["states"]
    assert (np.abs(moves).sum(-1) <= 1).all()
    step = envs.darkroom.MOVES[h["actions"][ends]]
    expected = np.clip(h["states"][ends] + step, 0, cfg["grid_size"] - 1)
    np.testing.assert_array_equal(h["next_states"][ends], expected)
    # rewards are the env's, before any bootstrapping: 1 exactly on the goal
    goal = np.array(envs.task_list(cfg)[3]["goal"])
    np.testing.assert_array_equal(h["rewards"], (h["next_states"] == goal).all(-1).astype(np.float32))


def test_key_to_door_histories():
    cfg = load_config(KEY_TO_DOOR, dict(grid_size=3, horizon=6, n_stream=3, n_steps=12, batch_size=12,
                                        n_epochs=1, total_source_timesteps=2 * 12 * 3, device="cpu", n_process=1))
    out = run_collect(cfg, [0, 40])
    for h in out.values():
        history.check_history(h, cfg, state_dim=3)
        assert set(np.unique(h["states"][..., 2])) <= {0.0, 1.0}


def test_same_seed_same_history_other_seed_other_history():
    a, b = run_collect(small_cfg(), [2]), run_collect(small_cfg(), [2])
    c = run_collect(small_cfg(alg_seed=7), [2])
    for f in history.FIELDS:
        np.testing.assert_array_equal(a[2][f], b[2][f])
    assert not np.array_equal(a[2]["actions"], c[2]["actions"])


def test_task_history_independent_of_chunk():
    """A task's history is the same whether it trains alone or with other tasks."""
    cfg = small_cfg()
    alone = run_collect(cfg, [5])
    together = run_collect(cfg, [1, 5, 9])
    chunked = run_collect(small_cfg(task_chunk=2), [9, 5, 1])
    for f in history.FIELDS:
        np.testing.assert_array_equal(alone[5][f], together[5][f], err_msg=f)
        np.testing.assert_array_equal(alone[5][f], chunked[5][f], err_msg=f)
        np.testing.assert_array_equal(together[9][f], chunked[9][f], err_msg=f)
    assert not np.array_equal(together[1]["actions"], together[9]["actions"])


def test_learners_per_task_split_a_task_into_independent_learners():
    """learners_per_task=2 over 4 streams: learner 0 (streams 0-1) is exactly the task's
    one learner of 2 streams, so nothing from learner 1's streams reaches it; learner 1 is
    another learner (its own seed), and the task keeps its 4 streams in the file's layout."""
    split = run_collect(small_cfg(learners_per_task=2), [3, 5])
    alone = run_collect(small_cfg(n_stream=2, total_source_timesteps=3 * 20 * 2), [3, 5])
    for i in (3, 5):
        assert split[i]["actions"].shape == (60, 4)
        assert split[i]["compress_markers"].shape == (60, 4)
        for f in history.FIELDS:
            np.testing.assert_array_equal(split[i][f][:, :2], alone[i][f], err_msg=f)
        assert not np.array_equal(split[i]["actions"][:, 2:], alone[i]["actions"])
    # one learner per stream also runs
    per_stream = run_collect(small_cfg(learners_per_task=4, batch_size=10), [3])[3]
    assert per_stream["actions"].shape == (60, 4)
    # a task's only (or first) learner keeps the seed tasks had before the key existed, so
    # files collected with learners_per_task=1 are the ones collected before it
    assert all(batched_ppo.learner_seed(a, i, 0) == task_seed(a, i) for a in (0, 42) for i in (0, 3, 640))
    assert len({batched_ppo.learner_seed(42, 3, j) for j in range(8)} | {task_seed(42, 4)}) == 9


def test_visit_counts_are_per_learner_and_per_observation():
    counts = batched_ppo.VisitCounts([3, 3, 2], n_learners=2, streams=2, coef=0.5)
    # learner 0's two streams arrive at one cell together; learner 1's at two others
    first = counts.bonus(np.array([[1, 2, 0], [1, 2, 0], [1, 2, 0], [1, 2, 1]]))
    np.testing.assert_allclose(first, [0.5 / np.sqrt(2)] * 2 + [0.5, 0.5])
    again = counts.bonus(np.array([[1, 2, 1], [1, 2, 0], [1, 2, 0], [0, 0, 0]]))
    np.testing.assert_allclose(again, [0.5, 0.5 / np.sqrt(3), 0.5 / np.sqrt(2), 0.5])


def test_count_bonus_0_leaves_the_histories_as_they_were(monkeypatch):
    """Off, no count is made: the rollout is the code path the data was collected with."""
    default = run_collect(small_cfg(learners_per_task=2, batch_size=10), [3])
    monkeypatch.setattr(batched_ppo, "VisitCounts", None)  # any use would fail
    off = run_collect(small_cfg(learners_per_task=2, batch_size=10, count_bonus=0.0), [3])
    for f in history.FIELDS:
        np.testing.assert_array_equal(default[3][f], off[3][f], err_msg=f)


def test_count_bonus_changes_the_learner_not_the_recorded_rewards():
    """The bonus only reaches PPO's update: the first rollout (before any update) is the same,
    later ones differ, and the file's rewards are still the env's (1 at the goal, else 0)."""
    # lr 3e-3: at 3e-4 two updates move the policy too little to change a sampled action
    cfg = small_cfg(learners_per_task=2, batch_size=10, source_lr=3e-3)
    off = run_collect(cfg, [3])[3]
    on = run_collect(small_cfg(learners_per_task=2, batch_size=10, source_lr=3e-3, count_bonus=1.0), [3])[3]
    n = cfg["n_steps"]
    for f in history.FIELDS:
        np.testing.assert_array_equal(off[f][:n], on[f][:n], err_msg=f)
    assert not np.array_equal(off["actions"][n:], on["actions"][n:])
    goal = np.array(envs.task_list(cfg)[3]["goal"])
    np.testing.assert_array_equal(on["rewards"], (on["next_states"] == goal).all(-1).astype(np.float32))


def test_memory_estimate_counts_every_learner():
    """Each learner of a task has its own network, gradients, Adam state and minibatch."""
    one = batched_ppo.bytes_per_task(small_cfg(), 10)
    four = batched_ppo.bytes_per_task(small_cfg(learners_per_task=4, batch_size=10), 10)
    net = BatchedActorCritic(1, 10, envs.n_actions(small_cfg()), torch.device("cpu"))
    n_params = sum(p.numel() for p in net.params.values())
    assert n_params == batched_net.parameters_per_network(10, envs.n_actions(small_cfg()))
    assert four - one >= 3 * n_params * 16


def test_task_chunk_calls_on_done_per_chunk():
    cfg = small_cfg(task_chunk=2)
    calls, progress = [], []
    batched_ppo.collect(cfg, [0, 1, 2, 3, 4], envs.task_list(cfg), lambda r: calls.append(sorted(r)),
                        lambda n, steps: progress.append((n, steps)))
    assert calls == [[0, 1], [2, 3], [4]]
    assert sum(n for n, _ in progress) == 5
    assert sum(s for _, s in progress) == 5 * history.steps_per_stream(cfg) * cfg["n_stream"]


def test_task_chunk_0_is_cut_to_fit_memory(monkeypatch, capsys):
    cfg = small_cfg()
    per_task = batched_ppo.bytes_per_task(cfg, 10)
    monkeypatch.setattr(batched_ppo, "available_memory", lambda device: 2 * 3 * per_task)
    assert batched_ppo.chunk_size(cfg, 10, 10, torch.device("cpu")) == 3
    assert "training 3 at a time" in capsys.readouterr().err
    assert batched_ppo.chunk_size(small_cfg(task_chunk=4), 10, 10, torch.device("cpu")) == 4  # asked for
    monkeypatch.setattr(batched_ppo, "available_memory", lambda device: 1 << 40)
    assert batched_ppo.chunk_size(cfg, 10, 10, torch.device("cpu")) == 10
    # however much memory there is, an automatic chunk is at most AUTO_CHUNK_TASKS tasks, so
    # finished tasks reach the disk while a big collection runs
    assert batched_ppo.chunk_size(cfg, 650, 10, torch.device("cpu")) == batched_ppo.AUTO_CHUNK_TASKS == 256
    assert capsys.readouterr().err == ""


def test_learns_on_a_small_darkroom():
    """Smoke check that the updates improve the policy: 3x3 darkroom, goal next to the start."""
    cfg = load_config(DARKROOM, dict(grid_size=3, horizon=10, n_stream=8, n_steps=20, batch_size=40,
                                     n_epochs=4, source_lr=3e-3, total_source_timesteps=30 * 20 * 8, device="cpu",
                                     n_process=1))
    h = run_collect(cfg, [5])[5]  # goal (1, 2): one step up from the centre
    returns = h["rewards"].reshape(-1, cfg["horizon"], cfg["n_stream"]).sum(1).mean(1)
    assert returns[-5:].mean() > returns[:5].mean() + 2
    assert returns[-5:].mean() > 6  # optimal is 10


# ----------------------------------------------------------------------------- collect.py

def collect_cli(tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "collect.py"), *map(str, DARKROOM), "--set", "backend=batched",
           "grid_size=3", "horizon=10", "n_stream=4", "n_steps=20", "batch_size=20", "n_epochs=1",
           "total_source_timesteps=160", f"dataset_dir={tmp_path}", "device=cpu", "n_process=1", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_collect_cli_writes_a_valid_file_and_resumes_after_a_chunk(tmp_path, monkeypatch):
    import collect
    from algorithm.history import dataset_path
    cfg = load_config(DARKROOM, dict(grid_size=3, horizon=10, n_stream=4, n_steps=20, batch_size=20, n_epochs=1,
                                     total_source_timesteps=160, dataset_dir=str(tmp_path), device="cpu",
                                     n_process=1, task_chunk=4))
    path = dataset_path(cfg)

    # a first run dies right after its first chunk of 4 tasks is written
    class Killed(Exception):
        pass

    original = batched_ppo.collect

    def dies_after_first_chunk(cfg, indices, tasks, on_done, progress):
        def on_done_then_die(results):
            on_done(results)
            raise Killed
        original(cfg, indices, tasks, on_done_then_die, progress)

    monkeypatch.setattr(batched_ppo, "collect", dies_after_first_chunk)
    with pytest.raises(Killed):
        collect.collect(cfg, path, list(range(9)))
    assert history.read_header(path)["done"] == list(range(4))
    monkeypatch.undo()

    # the same command again collects only the rest
    result = collect_cli(tmp_path, "task_chunk=4")
    assert result.returncode == 0, result.stderr
    assert "4 of 9 tasks already collected, 5 to go" in result.stdout
    assert history.read_header(path)["done"] == list(range(9))
    T = history.steps_per_stream(cfg)
    with h5py.File(path, "r") as f:
        assert f["8"].attrs["backend"] == "batched"
        for name, dtype in history.DTYPES.items():
            assert f["8"][name].dtype == dtype
        assert f["8"]["states"].shape == (T, 4, 2)
        np.testing.assert_array_equal(f["8"]["compress_markers"][()], history.compress_markers(T, 20, 4))
    rerun = collect_cli(tmp_path, "task_chunk=4")
    assert rerun.returncode == 0 and "0 to go" in rerun.stdout


# ----------------------------------------------------------------------------- equivalence with SB3

def final_returns(h, horizon, last=10):
    """Mean over streams of the episode returns, averaged over the last episodes."""
    returns = h["rewards"].reshape(-1, horizon, h["rewards"].shape[1]).sum(1).mean(1)
    return float(returns[-last:].mean()), returns


@pytest.mark.slow
def test_batched_follows_sb3_on_darkroom():
    """Same tasks and seeds, default 9x9 settings with 50 streams: the two backends' learning
    curves end in the same place, and both learn."""
    from algorithm import sb3_ppo
    cfg = load_config(DARKROOM, dict(n_stream=50, total_source_timesteps=50 * 1040, device="cpu", n_process=2))
    tasks = envs.task_list(cfg)
    indices = [30, 42, 49, 58]  # goals at distance 3-4 from the centre, in different directions
    batched, sb3 = {}, {}
    batched_ppo.collect(cfg, indices, tasks, batched.update)
    sb3_ppo.collect(cfg, indices, tasks, sb3.update)
    gaps, fractions = [], {"batched": [], "sb3": []}
    for i in indices:
        optimal = envs.optimal_return(cfg, tasks[i])
        b, _ = final_returns(batched[i], cfg["horizon"])
        s, _ = final_returns(sb3[i], cfg["horizon"])
        print(f"task {i} goal {tasks[i]['goal']} optimal {optimal}: batched {b:.2f} sb3 {s:.2f}")
        gaps.append(abs(b - s))
        fractions["batched"].append(b / optimal)
        fractions["sb3"].append(s / optimal)
    print("mean |gap|", np.mean(gaps), "fraction of optimal", {k: np.mean(v) for k, v in fractions.items()})
    assert np.mean(gaps) <= 1.5
    assert np.mean(fractions["batched"]) >= 0.7 and np.mean(fractions["sb3"]) >= 0.7


def test_worker_processes_give_the_same_histories():
    """n_process splits a chunk over worker processes; the histories do not change."""
    one = run_collect(small_cfg(n_process=1), [0, 4, 8])
    two = run_collect(small_cfg(n_process=2), [0, 4, 8])
    for i in one:
        for f in history.FIELDS:
            np.testing.assert_array_equal(one[i][f], two[i][f], err_msg=f"task {i} {f}")
