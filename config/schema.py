"""Every config key the toolkit knows: its type, default, allowed range and help text.

One flat namespace: the env, algorithm and model files are merged into one dict, so a key
means the same thing wherever it is set. `config/loading.py` validates against this table;
`python train.py --help` prints it. Add a key here before using it anywhere else (a family or
variant module adds its own with `add_keys`).
"""
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    help: str
    section: str
    choices: tuple | dict = ()  # a dict: a registry, its names are the choices (FAMILIES, VARIANTS)
    min: float | None = None  # inclusive
    max: float | None = None  # inclusive
    family: str = ""  # a family module's own key (add_keys(..., family=...)): used by that family only

    def allowed(self) -> tuple:
        return tuple(self.choices)


# numpy seeds must be >= 0 and torch's fit in 64 bits; signed, so that seed + 1 fits too
SEED = {"min": 0, "max": 2**63 - 1}


# The registries: name -> environment family (filled by env.family.register) and name ->
# model variant (model.variant.register). Their names are the values `env` and `model` take;
# each family or variant module registers itself, so this layer imports neither.
FAMILIES: dict = {}
VARIANTS: dict = {}


def _keys(section, **entries):
    return {name: Key(*spec[:3], section=section, **(spec[3] if len(spec) > 3 else {}))
            for name, spec in entries.items()}


SCHEMA: dict[str, Key] = {
    **_keys(
        "env",
        env=(str, "darkroom", "environment family (one module under env/)", {"choices": FAMILIES}),
        grid_size=(int, 9, "side of the square grid", {"min": 2, "max": 64}),
        horizon=(int, 20, "steps per episode (episodes always run to the horizon)", {"min": 1}),
        max_tasks=(int, 0, "use a seeded subset of this many of the family's tasks, split as usual "
                   "(0 = all of them; Dark Key-to-Door 9x9 has 6,561)", {"min": 0}),
        env_split_seed=(int, 0, "seed of the train/test task split (a pure function of it and the ratio)", SEED),
        train_env_ratio=(float, 0.9, "fraction of tasks not held out for test (training + validation)",
                         {"min": 0.0, "max": 1.0}),
        val_env_ratio=(float, 0.1, "fraction of all tasks taken from the non-test ones as validation tasks: "
                       "never trained on; every choice and the eval/ curves during training use them",
                       {"min": 0.0, "max": 1.0}),
    ),
    **_keys(
        "algorithm",
        alg=(str, "PPO", "what makes the learning histories: 'PPO' learners; 'PosteriorSampling', a "
             "learner that searches the grid for the hidden cells by posterior sampling "
             "(algorithm/posterior_sampling.py); 'QLearning', tabular Q-learning with optimistic "
             "initialisation, one independent learner per stream that knows nothing of the task "
             "(algorithm/q_learning.py); or 'NoisyExpert', an expert "
             "that knows the task acting epsilon-greedily with epsilon falling from 1 to 0 (AD-epsilon; "
             "algorithm/noisy_expert.py)", {"choices": ("PPO", "NoisyExpert", "PosteriorSampling", "QLearning")}),
        noise_decay_episodes=(int, 40, "alg NoisyExpert: episodes over which a stream's epsilon falls "
                              "linearly from 1 to 0 (then 0)", {"min": 1}),
        q_alpha=(float, 1.0, "alg QLearning: learning rate of the Q updates (1 suits a deterministic env)",
                 {"min": 0.0, "max": 1.0}),
        q_gamma=(float, 0.99, "alg QLearning: discount factor", {"min": 0.0, "max": 1.0}),
        q_init=(float, 2.0, "alg QLearning: initial value of every action (optimism: above any return "
                "an action can earn drives systematic exploration)"),
        q_epsilon=(float, 0.0, "alg QLearning: probability of a uniformly random action instead of the greedy "
                   "one (ties among the greedy ones are broken at random)", {"min": 0.0, "max": 1.0}),
        q_replay=(bool, True, "alg QLearning: at each episode end, replay the episode's transitions backwards "
                  "(one Q update each), so a reward's value reaches the start in one episode"),
        backend=(str, "batched", "PPO implementation: 'batched' trains all tasks at once in one "
                 "process (fast); 'sb3' runs one Stable-Baselines3 learner per task (reference)",
                 {"choices": ("batched", "sb3")}),
        n_steps=(int, 80, "rollout length per stream: one compression region (PPO: steps between updates)", {"min": 1}),
        batch_size=(int, 40, "PPO minibatch size", {"min": 1}),
        n_epochs=(int, 20, "PPO epochs per rollout", {"min": 1}),
        source_lr=(float, 3e-4, "PPO learning rate (Adam)", {"min": 0.0}),
        gamma=(float, 0.99, "PPO discount factor", {"min": 0.0, "max": 1.0}),
        gae_lambda=(float, 0.95, "PPO GAE lambda", {"min": 0.0, "max": 1.0}),
        clip_range=(float, 0.2, "PPO policy clip range", {"min": 0.0}),
        ent_coef=(float, 0.0, "PPO entropy bonus coefficient", {"min": 0.0}),
        vf_coef=(float, 0.5, "PPO value loss coefficient", {"min": 0.0}),
        max_grad_norm=(float, 0.5, "PPO gradient-norm clip", {"min": 0.0}),
        count_bonus=(float, 0.0, "batched PPO: exploration bonus c / sqrt(N(s')) added to the reward PPO learns "
                     "from, N(s') the learner's own visits so far to the observation it arrives at (each "
                     "discrete observation counted apart; nothing of the task); the recorded rewards stay the "
                     "env's. 0 = off", {"min": 0.0}),
        total_source_timesteps=(int, 100_000, "env steps per task, summed over streams "
                                "(rounded up to whole rollouts)", {"min": 1}),
        n_stream=(int, 100, "parallel copies of each task (independent histories)", {"min": 1}),
        learners_per_task=(int, 1, "batched backend: independent PPO learners per task, n_stream / "
                           "learners_per_task streams each. 1 (DICP's setting): all streams share one "
                           "learner, so a stream's policy also improves on what the other streams found, "
                           "which its own history does not show; n_stream: every stream is a learner of "
                           "its own, whose every change of policy its history explains", {"min": 1}),
        n_process=(int, 2, "worker processes: one per task at a time (sb3), or the slices of a task "
                   "chunk (batched, on CPU)", {"min": 1}),
        task_chunk=(int, 0, "batched backend: tasks trained together per chunk (0 = up to 256, and no "
                    "more than fit in half of the free memory); smaller chunks bound memory and "
                    "write results sooner",
                    {"min": 0}),
        alg_seed=(int, 42, "seed of the source learners (names the dataset file)", SEED),
    ),
    **_keys(
        "model",
        model=(str, "AD", "model variant (one module under model/)", {"choices": VARIANTS}),
        n_transit=(int, 240, "context length in steps (AD sliding window / two-region budget)", {"min": 2}),
        use_compressed_context=(bool, False, "two-region context with <compress> markers (model: AD only)"),
        compress_interval=(int, 80, "steps per compression region; must equal the n_steps the data "
                           "was collected with", {"min": 1}),
        token_type_loss_weight=(float, 0.1, "weight of the token-type loss in compressed mode", {"min": 0.0}),
        region_end_weight=(float, 10.0, "compressed mode: class weight of the region end in the token-type loss "
                           "(one token per region: at weight 1 the darkroom head never predicted it, recall 0.0 on "
                           "held-out streams; at 10 and 80 recall 1.0)", {"min": 0.0}),
        episode_stride=(int, 1, "training windows show every k-th episode of a learning history (the AD paper's "
                        "subsampling: a window spans k times as much of the source's improvement); 1 = consecutive "
                        "episodes. Needs episodes of one length; with use_compressed_context the two regions are the "
                        "rollouts that start k episodes apart (k episodes must be whole rollouts)", {"min": 1}),
        state_embedding=(str, "factored", "'factored': sum of per-coordinate embeddings (generalises to "
                         "held-out goal cells); 'cell': one learned vector per grid cell",
                         {"choices": ("factored", "cell")}),
        tf_n_embd=(int, 64, "transformer width", {"min": 8}),
        tf_n_layer=(int, 4, "transformer layers", {"min": 1}),
        tf_n_head=(int, 4, "attention heads", {"min": 1}),
        tf_dropout=(float, 0.0, "dropout in the transformer", {"min": 0.0, "max": 1.0}),
        n_latent=(int, 8, "CompressedAD: latent tokens per compression", {"min": 1}),
        enc_n_layer=(int, 2, "CompressedAD: encoder layers", {"min": 1}),
        latent_sets=(int, 1, "CompressedAD: latent sets the decoder reads, the newest first out; 1 = each "
                     "compression overwrites the latents, more = they accumulate (n_latent tokens per set)",
                     {"min": 1}),
        encoder_reads_latents=(bool, True, "CompressedAD: the encoder reads the previous latents with each stage "
                               "(recurrent memory); false: each set summarises its own stage only"),
        max_compression_depth=(int, 3, "CompressedAD: deepest compression trained on", {"min": 0}),
        grad_compression_rounds=(int, 1, "CompressedAD: compression rounds gradients flow through "
                                 "(older rounds are computed without grad)", {"min": 1}),
        segment_len=(int, 25, "SummaryAD: steps per segment; the history is cut into segments aligned to the "
                     "stream's (and a rollout's) first step, and each segment ends with a summary write",
                     {"min": 1}),
        n_summary=(int, 4, "SummaryAD: summary tokens the model writes at the end of each segment", {"min": 1}),
        summary_segments=(int, 5, "SummaryAD: segments whose summaries the context keeps (oldest out first): "
                          "at most summary_segments x n_summary summary tokens", {"min": 1}),
        train_segments=(int, 12, "SummaryAD: consecutive segments of one stream per training sample, decoded "
                        "in order with gradients through every summary write; must exceed summary_segments",
                        {"min": 2}),
        summary_grad_segments=(int, 0, "SummaryAD: 0 = gradients through every summary write of a sample; "
                               "G >= 2 = the summaries are detached every G segments (truncated "
                               "backpropagation through time in blocks of G segments)", {"min": 0}),
        lr=(float, 1e-3, "peak learning rate (AdamW)", {"min": 0.0}),
        weight_decay=(float, 0.01, "AdamW weight decay", {"min": 0.0}),
        warmup_steps=(int, 200, "linear warmup steps before the cosine decay", {"min": 0}),
        grad_clip=(float, 1.0, "gradient-norm clip (0 = off)", {"min": 0.0}),
        train_batch_size=(int, 64, "windows per optimiser step (per process under torchrun)", {"min": 1}),
        train_timesteps=(int, 5000, "optimiser steps", {"min": 1}),
        seed=(int, 0, "training seed (names the run directory)", SEED),
        num_workers=(int, 0, "DataLoader worker processes", {"min": 0}),
        data_cache_mb=(int, 0, "training data kept in memory, per loader process: whole tasks, the least "
                       "recently used out first (1.2x CompressedAD's targets/s at 400 tasks, once warm); 0 = read "
                       "every window from the file, memory flat however large the dataset", {"min": 0}),
        log_interval=(int, 50, "steps between TensorBoard train/ scalars", {"min": 1}),
        test_interval=(int, 250, "steps between held-out-stream test/ losses", {"min": 1}),
        eval_interval=(int, 1000, "steps between short in-context rollouts on validation tasks (0 = off)", {"min": 0}),
        ckpt_interval=(int, 500, "steps between checkpoints", {"min": 1}),
        test_stream_ratio=(float, 0.1, "fraction of each train task's streams held out for the test/ losses; 0: "
                           "the test/ losses come from every stream of the validation tasks (for data "
                           "with one stream per task)",
                           {"min": 0.0, "max": 0.5}),
    ),
    **_keys(
        "evaluation",
        eval_episodes=(int, 100, "episodes per in-context rollout", {"min": 1}),
        eval_rollouts=(int, 10, "independent rollouts per task", {"min": 1}),
        eval_split=(str, "test", "tasks to evaluate on: 'val' for every choice, 'test' only to report",
                    {"choices": ("test", "val", "train", "all")}),
        eval_tasks=(str, "", "comma-separated task indices (overrides eval_split)"),
        eval_greedy=(bool, False, "take the most likely action instead of sampling"),
        eval_temperature=(float, 0.5, "sample actions from softmax(logits / temperature); below 1 sharpens "
                          "the imitated source policy (chosen on the validation goals: 93% of optimal at 0.5, "
                          "92% at 0.3, 46% at 1.0)", {"min": 0.01}),
        eval_markers=(str, "model", "two-region mode: where regions end: 'model' (each rollout where its "
                      "token-type head predicts </compress>, or forced at n_transit // 2 steps) or 'interval' "
                      "(every compress_interval steps, as in the data: a region is one rollout of n_steps)",
                      {"choices": ("model", "interval")}),
        eval_seed=(int, 0, "seed of the evaluation rollouts", SEED),
        eval_memory=(str, "keep", "memory ablation: 'keep' (normal); 'drop': no memory of earlier episodes "
                     "(window variants drop every token older than the current episode at each episode "
                     "start; CompressedAD decodes without latents, as at depth 0 in training, and SummaryAD "
                     "without summaries, as in a stream's first segment); 'zero': CompressedAD's latents or "
                     "SummaryAD's summaries replaced by zeros (window variants: as 'drop'); 'shuffle': "
                     "the memory of a rollout on another task (its older tokens, latents or summaries)",
                     {"choices": ("keep", "drop", "zero", "shuffle")}),
    ),
    **_keys(
        "run",
        device=(str, "auto", "'auto' picks cuda when available, else cpu", {"choices": ("auto", "cpu", "cuda")}),
        cpu_threads=(int, 1, "torch intra-op threads on CPU (measured on 2 cores: a training step took "
                     "0.3 s with 1 thread and 2.0 s with 2 while another process ran)", {"min": 1}),
        dataset_dir=(str, "datasets", "where datasets are written and read"),
        run_dir=(str, "runs", "where training runs are written"),
    ),
}

def add_keys(section: str, family: str = "", **entries):
    """Config keys of a variant or family module: name=(type, default, help[, {choices, min, max}]).
    A family's keys (`family=` its name) define its data: they are collection keys (a dataset
    made with other values is another dataset), and they mean nothing for other families, so
    datasets and runs of another family never compare them (`applies`)."""
    taken = sorted(set(entries) & set(SCHEMA))
    if taken:
        raise ValueError(f"config keys {taken} exist already; give the new keys other names")
    SCHEMA.update({name: replace(key, family=family) for name, key in _keys(section, **entries).items()})
    if family:
        COLLECTION_KEYS.extend(entries)  # in place: other modules hold this list


# Keys that mean something to some sources only: PPO's settings are ignored by the other
# sources, the Q-learning keys by everything but QLearning, the noise schedule by everything but NoisyExpert.
# A key that does not apply is no part of a dataset's identity (collection_keys).
PPO_KEYS = ("batch_size", "n_epochs", "source_lr", "gamma", "gae_lambda", "clip_range", "ent_coef", "vf_coef",
            "max_grad_norm", "learners_per_task", "count_bonus")
Q_KEYS = ("q_alpha", "q_gamma", "q_init", "q_epsilon", "q_replay")
SOURCE_KEYS = {**{k: ("PPO",) for k in PPO_KEYS}, "noise_decay_episodes": ("NoisyExpert",),
               **{k: ("QLearning",) for k in Q_KEYS}}


def applies(key: str, cfg: dict) -> bool:
    """Whether `key` means something for cfg's environment family (a family's own keys only for
    it) and its source (`alg`: SOURCE_KEYS)."""
    alg = cfg.get("alg", "PPO")
    return SCHEMA[key].family in ("", cfg["env"]) and alg in SOURCE_KEYS.get(key, (alg,))


# Keys that change what a collection produces; a dataset collected with other values is
# a different dataset (backend is not here: both backends write the same schema).
COLLECTION_KEYS = [  # a list: add_keys(..., family=...) extends it in place
    "env", "grid_size", "horizon", "max_tasks", "env_split_seed", "train_env_ratio", "val_env_ratio",
    "alg", "n_steps", "batch_size", "n_epochs", "source_lr", "gamma", "gae_lambda",
    "clip_range", "ent_coef", "vf_coef", "max_grad_norm", "count_bonus", "total_source_timesteps",
    "n_stream", "learners_per_task", "alg_seed", "noise_decay_episodes",
    "q_alpha", "q_gamma", "q_init", "q_epsilon", "q_replay",
]

# keys added after datasets and runs were saved: the value those were made with
KEYS_ADDED_LATER = {"region_end_weight": 1.0, "max_tasks": 0, "episode_stride": 1, "learners_per_task": 1,
                    "noise_decay_episodes": 40, "count_bonus": 0.0}
COLLECTION_KEYS_ADDED_LATER = {k: v for k, v in KEYS_ADDED_LATER.items() if k in COLLECTION_KEYS}
