"""Distributed correctness, with real multi-process runs: two gloo ranks on the CPU through
`accelerate launch --config_file configs/accelerate/cpu_2proc.yaml` (the same launcher and DDP code path as GPUs).

What is checked, and why these setups:

- Rollouts are sharded by prompt (a prompt's K samples stay on one rank), the advantage estimator and whitening see
  the global batch, and the logged metrics are means over every rank's sequences: a probe run records each rank's
  tensors (tests/distributed_worker.py) and the test recomputes the global numbers from them.
- 2 processes at batch B follow the same trajectory as 1 process at batch 2B, and resuming moves between the two.
  Rollouts are sampled (temperature 1, full softmax) with the default counter sampler, whose randomness is keyed by
  (seed, step, global row), so two processes draw the tokens one process draws. Responses have their own lengths:
  the loss and the logged update statistics weigh each process's micro-batches by their share of the global token
  count, so they are the global values whatever the ranks' token counts. What remains is float32 reduction
  order: DDP averages gradients in another order than one process sums them, and the ranks pad prompts to other
  widths. That moves metrics by ~1e-7 relative per step; AdamW and 4 steps amplify it, hence the tolerance TOL.
- The 2-process runs also accumulate 2 micro-batches per optimizer step (grad_accum=2 under DDP no_sync) where the
  1-process run takes one batch of 8: accumulation over processes and micro-batches equals one big batch.
- One failing rank ends the whole job with its error, quickly (no hang).
- FSDP2 (tests/fsdp2_worker.py: accelerate's FSDP2 on gloo CPU processes) follows the same trajectories, RLOO and
  PPO, and its checkpoints (whole weights, AdamW state by name) resume across FSDP2 and plain runs both ways.
"""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, ROOT, compose_policy, run_script

LAUNCH = ["-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_2proc.yaml"]
ENV = {"PYTHONPATH": str(ROOT)}  # the launched processes import tests.conftest / tests.distributed_worker

# Relative / absolute tolerance on every logged metric of the 1-process vs 2-process trajectories (see above).
TOL = dict(rel=1e-4, abs=1e-5)

# Sampled rollouts (rollout.sampler=counter, the default) of up to 6 tokens each. 4 steps, a checkpoint after step 2. Two PPO
# epochs: with more, a clip fraction can flip on a single token whose ratio sits within float reduction-order noise
# (1e-7) of the clip edge, and clip fractions are counts, not continuous values.
TRAJECTORY = [*FAST, "algorithm=ppo", "trainer.ppo_epochs=2", "trainer.max_steps=4",
              "trainer.save_every=2", "trainer.keep_last=5", "trainer.sample_every=0", "trainer.torch_threads=1"]


def _launch(args, timeout=240):
    return run_script([*LAUNCH, *args], timeout=timeout, env=ENV)


def _train_two_processes(run_dir: Path, *overrides):
    proc = _launch(["scripts/train_policy.py", "trainer.cpu=true", *overrides, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_one_process(run_dir: Path, *overrides):
    from rlhf.config import validate_policy_config
    from rlhf.trainers.policy import PolicyTrainer

    threads = torch.get_num_threads()
    try:
        return PolicyTrainer(validate_policy_config(compose_policy(overrides, run_dir=str(run_dir)))).train()
    finally:
        torch.set_num_threads(threads)


def _assert_same_trajectory(expected: list[dict], got: list[dict]):
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for a, b in zip(expected, got):
        keys = [k for k in a if not k.startswith(("time/", "memory/"))]
        assert set(keys) <= set(b), set(keys) - set(b)
        for key in keys:
            assert b[key] == pytest.approx(a[key], **TOL), (a["step"], key, a[key], b[key])


def _whiten_by_hand(per_sequence: list[float], mask: torch.Tensor) -> torch.Tensor:
    """Each row's value on its real tokens, whitened over all real tokens: (x - mean) / sqrt(unbiased var + 1e-8),
    as rlhf.core.losses.masked_whiten does; 0 on padding. ``mask``: (rows, width) bool."""
    tokens = [v for v, m in zip(per_sequence, mask) for _ in range(int(m.sum()))]
    mean = sum(tokens) / len(tokens)
    var = sum((t - mean) ** 2 for t in tokens) / (len(tokens) - 1)
    out = torch.zeros(mask.shape)
    for i, v in enumerate(per_sequence):
        out[i, mask[i]] = (v - mean) / (var + 1e-8) ** 0.5
    return out


def _copy_checkpoint(src_run: Path, dst_run: Path, step: int) -> None:
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / f"step_{step}", dst_run / "checkpoints" / f"step_{step}")


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """The same 4-step run twice: 1 process with batch 8, and 2 processes with batch 4 each in 2 micro-batches."""
    base = tmp_path_factory.mktemp("trajectories")
    one = _train_one_process(base / "one", *TRAJECTORY)
    two = _train_two_processes(base / "two", *TRAJECTORY, "trainer.grad_accum=2")
    return base, one, two


# ---------------------------------------------------------------------------------------------- fast, 1 process
def test_batch_8_with_accumulation_1_equals_batch_1_with_accumulation_8(tmp_path):
    """One optimizer step on the same 8 rollouts: one micro-batch of 8, or 8 micro-batches of 1 accumulated. Each
    micro-batch loss is scaled by its share of the minibatch's tokens, so the summed gradients are the same."""
    from rlhf.config import validate_policy_config
    from rlhf.trainers.policy import PolicyTrainer

    grads, params = {}, {}
    for accum in (1, 8):
        cfg = validate_policy_config(compose_policy(
            [*FAST, "algorithm=ppo", "trainer.max_steps=1", "trainer.ppo_epochs=1", f"trainer.grad_accum={accum}",
             "trainer.warmup_steps=0"], run_dir=str(tmp_path / f"accum{accum}")))
        trainer = PolicyTrainer(cfg)
        seen = []
        torch_optimizer = trainer.optimizer.optimizer  # under the AcceleratedOptimizer

        def record(opt, args, kwargs, seen=seen):
            seen.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"]])

        torch_optimizer.register_step_pre_hook(record)
        trainer.train()
        assert len(seen) == 1  # one epoch x one minibatch: one optimizer step, whatever the accumulation
        grads[accum] = seen[0]
        params[accum] = [p.detach().clone() for g in torch_optimizer.param_groups for p in g["params"]]
    nonzero = sum(bool(g.abs().sum() > 0) for g in grads[1])
    assert nonzero > len(grads[1]) // 2  # the update is not trivially zero
    for g1, g8 in zip(grads[1], grads[8]):
        # Same sums in another order: float32 rounding only.
        torch.testing.assert_close(g8, g1, rtol=1e-4, atol=1e-7)
    for p1, p8, g1 in zip(params[1], params[8], grads[1]):
        # AdamW's first step moves each weight by lr * g / (|g| + eps): equal gradients, equal weights. Where |g| is
        # near eps = 1e-8 that step is as sensitive to g's rounding as g / eps, so compare where |g| > 1e-6 (the
        # step is then lr * sign(g) to 1%); the gradients themselves were compared everywhere above.
        big = g1.abs() > 1e-6
        torch.testing.assert_close(p8[big], p1[big], rtol=0, atol=1e-5)


def _check_backend(dist_type, *overrides, ds_config=None, critic=False, zero_stage=2, engine="hf", fsdp_version=2):
    """Run the backend's and the rollout engine's checks against a stand-in accelerator (accelerate builds DeepSpeed
    and FSDP on GPUs only)."""
    from types import SimpleNamespace

    from rlhf.config import validate_policy_config
    from rlhf.rollout.engines import check_backend
    from rlhf.runtime.backend import DistributedBackend

    cfg = validate_policy_config(compose_policy([*FAST, "algorithm=rloo", *overrides], run_dir="unused"),
                                 world_size=2)
    cfg.rollout.engine = engine  # set after validation, which would refuse vllm where it is not installed
    plugin = SimpleNamespace(deepspeed_config=ds_config, zero_stage=zero_stage)
    fsdp = SimpleNamespace(fsdp_version=fsdp_version)
    acc = SimpleNamespace(distributed_type=dist_type, num_processes=2,
                          state=SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=fsdp))
    backend = DistributedBackend(acc)
    backend.check(cfg.trainer, cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt // 2, critic)
    check_backend(cfg.rollout.engine, backend.kind)


def test_backend_guards_refuse_what_the_trainer_cannot_do_under_deepspeed_or_fsdp():
    from accelerate.utils import DistributedType

    from rlhf.config import ConfigError

    ds = DistributedType.DEEPSPEED
    _check_backend(DistributedType.MULTI_GPU, critic=True)  # DDP: everything goes, PPO's critic too
    fsdp = DistributedType.FSDP
    _check_backend(fsdp)  # FSDP2 with RLOO
    with pytest.raises(ConfigError, match="fsdp_version is 1; only FSDP2"):
        _check_backend(fsdp, fsdp_version=1)
    _check_backend(fsdp, critic=True)  # PPO: policy and critic prepared as one PolicyAndValue
    with pytest.raises(ConfigError, match="^rollout.engine: vllm .* FSDP2"):
        _check_backend(fsdp, engine="vllm")
    with pytest.raises(ConfigError, match="^algorithm.critic:"):
        _check_backend(ds, ds_config={"gradient_accumulation_steps": 1}, critic=True)
    with pytest.raises(ConfigError, match="^trainer.grad_accum:"):
        _check_backend(ds, "trainer.grad_accum=2", ds_config={"gradient_accumulation_steps": 1})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 4"):
        _check_backend(ds, ds_config={"gradient_accumulation_steps": 4})
    with pytest.raises(ConfigError, match="^trainer.max_grad_norm:"):
        _check_backend(ds, "trainer.max_grad_norm=0.5", ds_config={"gradient_accumulation_steps": 1,
                                                                    "gradient_clipping": 1.0})
    with pytest.raises(ConfigError, match="^rollout.engine: vllm .* ZeRO-3"):
        _check_backend(ds, ds_config={"gradient_accumulation_steps": 1}, zero_stage=3, engine="vllm")
    _check_backend(ds, ds_config={"gradient_accumulation_steps": 1}, zero_stage=2, engine="vllm")
    config = {"gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": "auto"}
    _check_backend(ds, "trainer.max_grad_norm=1.0", ds_config=config)
    # 4 prompts x 2 samples over 2 processes = 4 rollouts each, in trainer.minibatches=1 backward passes of 4;
    # DeepSpeed's train batch = micro 4 x accumulation 1 x 2 processes.
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["train_batch_size"] == 8


def test_checkpoint_without_optimizer_state_resumes_with_a_warning(tmp_path):
    """DeepSpeed checkpoints carry no optimizer state (it is partitioned); resuming one restarts AdamW."""
    _train_one_process(tmp_path / "run", *FAST, "trainer.max_steps=1")
    state_file = tmp_path / "run" / "checkpoints" / "step_1" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    state["optimizer"] = None
    torch.save(state, state_file)
    with pytest.warns(UserWarning, match="no optimizer state"):
        tail = _train_one_process(tmp_path / "run", *FAST, "trainer.max_steps=2", "trainer.resume=auto")
    assert [m["step"] for m in tail] == [1]


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_rollouts_sharded_by_prompt_estimates_and_metrics_global(tmp_path):
    """Probe run (RLOO, 2 steps, sampled rollouts): what each rank saw, recomputed globally by hand."""
    from rlhf.config import validate_policy_config
    from rlhf.trainers.policy import PolicyTrainer

    overrides = [*FAST, "algorithm=rloo", "trainer.max_steps=2", "trainer.sample_every=0"]
    proc = _launch(["tests/distributed_worker.py", str(tmp_path / "probe"), *overrides,
                    f"run_dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "probe" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    single = PolicyTrainer(validate_policy_config(compose_policy(overrides, run_dir=str(tmp_path / "single"))))
    k = 2
    for step in (0, 1):
        # Sharding: rank 0 then rank 1 is one process's batch of 4 prompts, 2 prompts each.
        assert ranks[0]["prompts"][step] + ranks[1]["prompts"][step] == single.prompt_batch(step)
        for r in ranks:
            q = r["rollouts"][step]["query_ids"]
            # The K samples of a prompt are consecutive rows of the same rank: 2 prompts x K = 4 rows.
            assert q.shape[0] == len(r["prompts"][step]) * k == 4
            assert torch.equal(q[0::2], q[1::2])

        # Advantages: RLOO over each prompt's K = 2 samples, then whitened over ALL ranks' tokens.
        width = 6  # rollout.max_new_tokens: the ranks' tensors are padded to it before gathering
        pad = torch.nn.functional.pad
        rewards = torch.cat([pad(r["rewards"][step], (0, width - r["rewards"][step].shape[1])) for r in ranks])
        mask = torch.cat([pad(r["rollouts"][step]["response_mask"],
                              (0, width - r["rollouts"][step]["response_mask"].shape[1])) for r in ranks]).bool()
        returns = [float(rewards[i][mask[i]].sum()) for i in range(8)]
        # K = 2: the leave-one-out baseline of row i is the return of its partner row i ^ 1.
        per_seq = [returns[i] - returns[i ^ 1] for i in range(8)]
        expected = _whiten_by_hand(per_seq, mask)
        got = torch.cat([pad(r["advantages"][step], (0, width - r["advantages"][step].shape[1])) for r in ranks])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # Whitening rank 0's rows alone gives other numbers, so the check above tells global from local.
        assert not torch.allclose(_whiten_by_hand(per_seq[:4], mask[:4]), expected[:4], atol=1e-3)

        # Metrics: means over the 8 sequences of both ranks, identical on both ranks.
        ro = [r["rollouts"][step] for r in ranks]
        scores = torch.cat([x["scores"] for x in ro])
        kl = torch.cat([((x["logprobs"] - x["ref_logprobs"]) * x["response_mask"]).sum(-1) for x in ro])
        lengths = torch.cat([x["response_mask"].sum(-1).float() for x in ro])
        metrics = [r["history"][step] for r in ranks]
        assert metrics[0]["score"] == pytest.approx(scores.mean().item(), abs=1e-6)
        assert metrics[0]["kl"] == pytest.approx(kl.mean().item(), abs=1e-6)
        assert metrics[0]["response_length"] == pytest.approx(lengths.mean().item(), abs=1e-6)
        for key in ("score", "kl", "reward", "response_length", "entropy", "policy/loss"):
            assert metrics[1][key] == metrics[0][key], key
    # After one update the policy has left the reference: a zero KL at step 1 would mean it was never measured.
    assert abs(ranks[0]["history"][1]["kl"]) > 0
    # Rank 0 alone wrote the checkpoint, once, at the end.
    assert [r["saves"] for r in ranks] == [[2], []]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_2"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]  # one line per step, not one per rank


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory(trajectories):
    base, one, two = trajectories
    assert abs(two[0]["kl"]) < 1e-6  # the reference is the initial policy on every rank
    assert one[-1]["kl"] != pytest.approx(0.0, abs=1e-6)  # ...and the policy moved: the comparison is not trivial
    _assert_same_trajectory(one, two)
    for run in ("one", "two"):
        assert sorted(p.name for p in (base / run / "checkpoints").iterdir()) == ["step_2", "step_4"]


@pytest.mark.slow
def test_resume_two_processes_checkpoint_with_one_process(trajectories):
    base, one, two = trajectories
    _copy_checkpoint(base / "two", base / "two_to_one", 2)
    tail = _train_one_process(base / "two_to_one", *TRAJECTORY, "trainer.resume=auto")
    _assert_same_trajectory(two[2:], tail)
    _assert_same_trajectory(one[2:], tail)


@pytest.mark.slow
def test_resume_one_process_checkpoint_with_two_processes(trajectories):
    base, one, _ = trajectories
    _copy_checkpoint(base / "one", base / "one_to_two", 2)
    tail = _train_two_processes(base / "one_to_two", *TRAJECTORY, "trainer.grad_accum=2", "trainer.resume=auto")
    _assert_same_trajectory(one[2:], tail)


@pytest.mark.slow
def test_global_shuffle_two_processes_with_minibatches_follow_one_process(tmp_path):
    """trainer.shuffle=global with trainer.minibatches=2: the minibatches come from one stratified shuffle of the
    global batch (rlhf.rollout.sampling.minibatch_rows), so 2 processes update on exactly the minibatches 1 process does
    (PPO: the critic's too). With shuffle=process (the default) each process permutes its own rows with its own
    seed, and this comparison fails at step 0's update statistics (checked). No value clipping here: with it, one
    token's value change sat within float noise of the 0.2 clip edge at step 1, and value/clipfrac, a count,
    differed by one token while every continuous metric agreed to 1e-6."""
    run = [*TRAJECTORY, "trainer.minibatches=2", "trainer.shuffle=global", "trainer.max_steps=3",
           "trainer.save_every=0", "trainer.value_clip=null"]
    one = _train_one_process(tmp_path / "one", *run)
    two = _train_two_processes(tmp_path / "two", *run, "trainer.grad_accum=2")
    _assert_same_trajectory(one, two)


@pytest.mark.slow
def test_one_failing_rank_ends_the_job_with_its_error(tmp_path):
    """A reward function that raises on rank 1 only: rank 0 is then waiting in a collective. The job must stop
    with rank 1's message and a non-zero status, well before any timeout, instead of hanging."""
    start = time.monotonic()
    proc = _launch(["scripts/train_policy.py", "trainer.cpu=true", *FAST, "trainer.max_steps=3",
                    "reward.function=tests.distributed_worker.reward_fails_on_rank_1",
                    f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "reward service unreachable from rank 1" in out
    assert "reward_fails_on_rank_1" in out  # the one-line error names the function
    assert elapsed < 90, elapsed
    assert not (tmp_path / "run" / "checkpoints").exists()  # no step finished: nothing to save


# RLOO under FSDP2 (PPO has its own test below), sampled rollouts of up to 6 tokens, 3 steps, checkpoints at 2 and 3.
FSDP2_RUN = [*FAST, "algorithm=rloo", "trainer.max_steps=3", "trainer.save_every=2", "trainer.keep_last=5",
             "trainer.sample_every=0", "trainer.torch_threads=1"]


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def fsdp2_baseline(tmp_path_factory):
    """FSDP2_RUN on one plain process: (run folder, logged metrics)."""
    run = tmp_path_factory.mktemp("fsdp2_baseline")
    return run, _train_one_process(run, *FSDP2_RUN)


def _train_fsdp2(run_dir: Path, *overrides) -> list[dict]:
    proc = _launch(["tests/fsdp2_worker.py", str(run_dir), "trainer.cpu=true", *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp2_two_processes_follow_the_one_process_trajectory(fsdp2_baseline, tmp_path):
    """FSDP2 over two gloo processes (tests/fsdp2_worker.py: accelerate's FSDP2 with configs/accelerate/fsdp2.yaml's
    settings; accelerate only builds FSDP on GPUs, torch's fully_shard runs on gloo too). Each process holds half of
    every weight and of AdamW's state; decoding gathers the weights once and both processes step in lockstep
    (synced_gpus) although their responses end at different lengths; gradients are reduce-scattered; the
    checkpoint gathers the whole weights. Against one plain process at twice the batch, with 2 accumulated
    micro-batches per process (FSDP2's gradient-sync switch): the same metrics at every step within TOL, and the
    same checkpoint weights to float32 rounding. The checkpoint then resumes with one plain process."""
    one_run, one = fsdp2_baseline
    two = _train_fsdp2(tmp_path / "fsdp2", *FSDP2_RUN, "trainer.grad_accum=2")
    lengths = {m["response_length"] for m in one}
    assert len(lengths) > 1 or min(lengths) < 6  # some responses ended early: lockstep decoding was exercised
    assert one[-1]["kl"] != pytest.approx(0.0, abs=1e-6)  # the policy moved: the comparison is not trivial
    _assert_same_trajectory(one, two)

    ckpt_one, ckpt_two = (run / "checkpoints" / "step_3" for run in (one_run, tmp_path / "fsdp2"))
    w_one, w_two = _safetensors(ckpt_one / "policy"), _safetensors(ckpt_two / "policy")
    assert w_two.keys() == w_one.keys()
    for name, value in w_one.items():
        # Whole tensors, not one process's half: the gather happened.
        assert w_two[name].shape == value.shape, name
        torch.testing.assert_close(w_two[name], value, rtol=1e-4, atol=1e-5, msg=name)
    config = json.loads((ckpt_two / "policy" / "config.json").read_text())
    assert not any(a.startswith("FSDP") for a in config["architectures"])  # loadable by class name (vLLM)
    # AdamW's state, sharded over the processes, is gathered by parameter name: whole tensors, every trained weight.
    optimizer = torch.load(ckpt_two / "trainer_state.pt", weights_only=False)["optimizer"]["by_name"]
    assert set(optimizer["state"]) == set(w_one)
    assert all(v["exp_avg"].shape == w_one[k].shape for k, v in optimizer["state"].items())
    # Resuming the step-2 checkpoint on one plain process continues the same trajectory: weights, AdamW moments,
    # schedule and counters all came back (restarted moments would change step 2's update and step 3's metrics).
    _copy_checkpoint(tmp_path / "fsdp2", tmp_path / "resumed", 2)
    tail = _train_one_process(tmp_path / "resumed", *FSDP2_RUN, "trainer.resume=auto")
    _assert_same_trajectory(one[2:], tail)


@pytest.mark.slow
def test_fsdp2_resumes_a_one_process_checkpoint(fsdp2_baseline, tmp_path):
    """A plain 1-process checkpoint (AdamW's state keyed by parameter index) resumed by 2 FSDP2 processes, which
    take their shards of it: the run continues the 1-process trajectory."""
    one_run, one = fsdp2_baseline
    _copy_checkpoint(one_run, tmp_path / "resumed", 2)
    tail = _train_fsdp2(tmp_path / "resumed", *FSDP2_RUN, "trainer.resume=auto")
    _assert_same_trajectory(one[2:], tail)


@pytest.mark.slow
def test_fsdp2_ppo_follows_the_one_process_trajectory_and_resumes_either_way(trajectories, tmp_path):
    """PPO under FSDP2: the policy and the critic are prepared as one PolicyAndValue, each its own fully_shard unit,
    with one AdamW over both. 2 FSDP2 processes follow the 1-process PPO trajectory of the `trajectories` fixture
    (4 steps, 2 epochs, grad_accum=2 per process); the step-4 checkpoint holds the whole policy and critic
    weights, equal to the 1-process ones; the 1-process step-2 checkpoint (AdamW state keyed by index, two
    groups) resumed by 2 FSDP2 processes, and the FSDP2 step-2 checkpoint resumed by 1 process, continue it."""
    base, one, _ = trajectories
    fsdp2 = _train_fsdp2(tmp_path / "fsdp2", *TRAJECTORY, "trainer.grad_accum=2")
    _assert_same_trajectory(one, fsdp2)
    for part in ("policy", "value"):
        w_one = _safetensors(base / "one" / "checkpoints" / "step_4" / part)
        w_two = _safetensors(tmp_path / "fsdp2" / "checkpoints" / "step_4" / part)
        assert w_two.keys() == w_one.keys()
        for name, value in w_one.items():
            torch.testing.assert_close(w_two[name], value, rtol=1e-4, atol=1e-5, msg=f"{part}: {name}")
    _copy_checkpoint(base / "one", tmp_path / "one_to_fsdp2", 2)
    _assert_same_trajectory(one[2:], _train_fsdp2(tmp_path / "one_to_fsdp2", *TRAJECTORY, "trainer.resume=auto"))
    _copy_checkpoint(tmp_path / "fsdp2", tmp_path / "fsdp2_to_one", 2)
    _assert_same_trajectory(one[2:], _train_one_process(tmp_path / "fsdp2_to_one", *TRAJECTORY, "trainer.resume=auto"))


@pytest.mark.slow
def test_fsdp2_layer_by_layer_decoding_follows_the_same_trajectory(fsdp2_baseline, tmp_path):
    """rollout.gather_for_generation=false: decoding gathers each layer at every token (the least memory). Each
    decoding step is then a collective, so the processes must step in lockstep (synced_gpus) until both are done,
    and decoding must run under no_grad: under inference_mode the next training forward fails on FSDP2's
    gathered weights (checked)."""
    _, one = fsdp2_baseline
    _assert_same_trajectory(one, _train_fsdp2(tmp_path / "fsdp2", *FSDP2_RUN, "rollout.gather_for_generation=false"))


def test_a_hung_rank_fails_the_job_after_the_process_group_timeout(tmp_path):
    """Rank 1 never returns from its reward function, so rank 0 waits in the next collective. With
    trainer.dist_timeout_s=10 the collective times out, rank 0 fails, and the launcher tears rank 1 down: the job
    ends non-zero in bounded time instead of hanging for torch's default 30 minutes."""
    start = time.monotonic()
    proc = _launch(["scripts/train_policy.py", "trainer.cpu=true", *FAST, "trainer.max_steps=3",
                    "trainer.dist_timeout_s=10", "reward.function=tests.distributed_worker.reward_hangs_on_rank_1",
                    f"hydra.run.dir={tmp_path / 'run'}"], timeout=180)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 150, elapsed


# ---------------------------------------------------------------------------------------------- SFT and reward stages
STAGE_FAST = ["data.num_train=256", "data.num_eval=64", "trainer.batch_size=16", "trainer.warmup_steps=2",
              "trainer.max_steps=6", "trainer.eval_every=3", "trainer.log_every=1", "logging.progress=false",
              "logging.tensorboard=false", "trainer.torch_threads=1"]


def _stage_one_process(stage: str, run_dir: Path) -> list[dict]:
    from rlhf import config as C
    from tests.conftest import compose_config

    threads = torch.get_num_threads()
    cfg = compose_config(stage, STAGE_FAST, run_dir)
    try:
        if stage == "sft":
            from rlhf.trainers.sft import train_sft
            return train_sft(C.validate_sft_config(cfg))
        from rlhf.trainers.reward import train_reward
        return train_reward(C.validate_reward_config(cfg))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sft_and_reward_two_processes_follow_one_process(stage, tmp_path):
    """The batch (16 rows) is global: 2 processes take 8 rows each. The SFT loss is a mean over target tokens, and
    the ranks' rows hold different numbers of tokens, so each rank's loss is weighted by its share of the global
    token count (rlhf.trainers.sft.process_weight): the logged train/loss, the gradient and the weights then match 1
    process. An unweighted mean of the two ranks' means would differ from step 0's train/loss on. Reward rows are
    pairs, equal per rank, so their per-row means average exactly."""
    from transformers import AutoModel

    one = _stage_one_process(stage, tmp_path / "one")
    proc = _launch([f"scripts/train_{stage}.py", "trainer.cpu=true", *STAGE_FAST,
                    f"hydra.run.dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == list(range(7))
    assert one[-1]["eval/loss"] < one[0]["eval/loss"]  # it trained: the comparison is not of two idle runs
    _assert_same_trajectory(one, two)
    weights = [AutoModel.from_pretrained(tmp_path / run / "final").state_dict() for run in ("one", "two")]
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-4, atol=1e-5)
