"""Data-parallel training under torchrun (gloo, 2 processes, the tiny model): equal to one process.

The multi-process tests launch ``python -m torch.distributed.run --standalone`` as users do.
One process and two ranks sample from the same per-prompt streams, so they reach the same
adapter up to floating-point reduction order.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_run_config
from grpo import checkpoint, dist
from grpo.cli import main
from grpo.config import load_config
from grpo.engines.base import SamplingParams, stream_seed
from grpo.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_step_worker import one_step  # noqa: E402


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    # its own session, so that a timeout kills the ranks too, not only the launcher (a hung rank
    # would otherwise outlive the test run)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _empty_config(tmp: Path) -> str:
    path = tmp / "empty.yaml"
    path.write_text("# all settings come from overrides\n")
    return str(path)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: dict, b: dict, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        rel = float((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12))
        assert rel < rtol, f"{k}: relative difference {rel:.2e}"
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)  # it did train


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ unit
def test_rank_slices_keep_groups_whole_and_cover_everything():
    assert [DistRange(r, 2, 4, "slice") for r in (0, 1)] == [range(0, 2), range(2, 4)]
    assert [DistRange(r, 2, 5, "share") for r in (0, 1)] == [range(0, 3), range(3, 5)]
    assert [DistRange(r, 3, 1, "share") for r in (0, 1, 2)] == [range(0, 1), range(1, 1), range(1, 1)]
    assert dist.DistInfo().slice(4) == range(0, 4)


def DistRange(rank: int, world: int, count: int, how: str) -> range:
    return getattr(dist.DistInfo(rank, world), how)(count)


def test_prompts_per_step_must_divide_by_world_size():
    with pytest.raises(UserError, match=r"rollout.prompts_per_step \(6\) must be divisible by the number of ranks \(4\)"):
        dist.check_divisible(6, "rollout.prompts_per_step", dist.DistInfo(0, 4))
    dist.check_divisible(8, "rollout.prompts_per_step", dist.DistInfo(0, 4))


def test_collectives_are_identities_in_one_process():
    assert not dist.info().enabled
    assert dist.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert dist.all_gather_concat([1, 2]) == [1, 2]


def test_a_rank_ends_through_finish_with_its_output_flushed():
    """One process returns the exit code; a process that joined a group exits in ``finish``
    with its buffered output written and without interpreter finalization (no atexit)."""
    assert dist.finish(3) == 3
    script = ("import atexit, sys\n"
              "from grpo import dist\n"
              "atexit.register(lambda: print('finalized', file=sys.stderr))\n"
              "dist._joined = True\n"
              "sys.stdout.write('written before exit')\n"
              "dist.finish(5)\n"
              "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (proc.returncode, proc.stdout, proc.stderr) == (5, "written before exit", "")


def test_distributed_config_is_validated():
    with pytest.raises(UserError, match="distributed.strategy"):
        load_config(None, ["distributed.strategy=zero3"])
    with pytest.raises(UserError, match="distributed.timeout_s must be > 0"):
        load_config(None, ["distributed.timeout_s=0"])
    assert load_config(None, ["distributed.strategy=fsdp2"]).distributed.strategy == "fsdp2"


def test_stream_seed_is_a_pure_function_of_its_key():
    assert stream_seed(0, 3, 1) == stream_seed(0, 3, 1)
    seeds = {stream_seed(seed, step, i) for seed in (0, 1) for step in (0, 1) for i in range(4)}
    assert len(seeds) == 16
    assert all(0 <= s < 2 ** 48 for s in seeds)


def test_prompt_streams_make_a_group_independent_of_its_batch_mates(tiny_model_dir):
    from grpo.engines.hf import HFEngine
    from grpo.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    engine = HFEngine(load_causal_lm(str(tiny_model_dir), "float32", "cpu"), tok, seed=0)
    a, b = [1, 10, 11, 12, 13, 14], [1, 20, 21]
    params = SamplingParams(n=4, max_new_tokens=6, temperature=1.0)
    together = engine.generate([a, b], params, prompt_seeds=[11, 22])
    alone = engine.generate([b], params, prompt_seeds=[22])
    again = engine.generate([a], params, prompt_seeds=[11])
    assert [c.token_ids for c in together[1]] == [c.token_ids for c in alone[0]]
    assert [c.token_ids for c in together[0]] == [c.token_ids for c in again[0]]
    other = engine.generate([b], params, prompt_seeds=[23])
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in alone[0]]


# ----------------------------------------------------------------- two processes
@pytest.mark.parametrize("strategy,extra", [
    ("ddp", []),
    # rank 1's groups are all dropped: it joins the gradient reduction with a zero-weight micro-batch
    ("ddp", ["loss.drop_zero_variance=true"]),
    # FSDP2 needs equal micro-batch counts (per-layer collectives): rank 1 pads up to rank 0's
    ("fsdp2", ["loss.drop_zero_variance=true"]),
    # activation checkpointing on the two ranks, against one process without it
    ("ddp", ["optim.activation_checkpointing=true"]),
    ("fsdp2", ["loss.drop_zero_variance=true", "optim.activation_checkpointing=true"]),
    # micro-batches cut by a memory budget (tight: several per rank), against one process with the same budget
    ("ddp", ["optim.memory_budget_gb=0.0002"]),
    ("fsdp2", ["loss.drop_zero_variance=true", "optim.memory_budget_gb=0.0002"]),
], ids=["ddp", "ddp-rank1-empty", "fsdp2-rank1-empty", "ddp-checkpointing", "fsdp2-checkpointing",
        "ddp-memory-budget", "fsdp2-memory-budget-rank1-empty"])
def test_one_step_loss_and_gradients_match_one_process(tiny_model_dir, toy_plugin, tmp_path, strategy, extra):
    reference = [e for e in extra if not e.startswith("optim.activation_checkpointing")]
    one_step(str(tiny_model_dir), str(toy_plugin), str(tmp_path / "one.pt"), "ddp", reference)
    worker = str(Path(__file__).resolve().parent / "dist_step_worker.py")
    proc = torchrun([worker, str(tiny_model_dir), str(toy_plugin), str(tmp_path / "two.pt"), strategy, *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["tokens"] == one["tokens"]  # the global token-mean normaliser
    if any(e.startswith("optim.memory_budget_gb") for e in extra):
        assert one["micro_batches"] > 2 and two["micro_batches"] > 1  # the budget did split the batch
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-8)
    assert one["grads"].keys() == two["grads"].keys()
    for k, g in one["grads"].items():
        assert float(g.abs().max()) > 0, k
        torch.testing.assert_close(two["grads"][k], g, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_micro_batch_composition_does_not_change_the_update(tiny_model_dir, toy_plugin, tmp_path, aggregation):
    """Whole-batch normalisers: 1 sequence per micro-batch and all 16 in one give the same loss and gradients."""
    runs = {}
    for mb in (1, 16):
        out = tmp_path / f"mb{mb}.pt"
        one_step(str(tiny_model_dir), str(toy_plugin), str(out), "ddp",
                 [f"optim.micro_batch_size={mb}", f"loss.aggregation={aggregation}"])
        runs[mb] = torch.load(out)
    assert runs[1]["loss"] == pytest.approx(runs[16]["loss"], rel=1e-5, abs=1e-7)  # ~0 at ratio 1
    for k, g in runs[16]["grads"].items():  # float32 sums blocked differently: tolerance scaled to the tensor
        torch.testing.assert_close(runs[1]["grads"][k], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))


@pytest.fixture(scope="module")
def two_rank_run(tiny_model_dir, toy_plugin, tmp_path_factory):
    """A 3-step run on 2 ranks (checkpoints at steps 2 and 3) and the same run in one process
    (with dynamic sampling on, so its decisions are taken on the gathered batch too)."""
    tmp = tmp_path_factory.mktemp("dist")
    common = {"steps": 3, "checkpoint_every": 2, "rollout.prompts_per_step": 4, "eval.num_problems": 3,
              "eval.num_samples": 2, "rollout.dynamic_sampling": "true", "rollout.max_sampling_rounds": 2}
    runs = {}
    for name in ("one", "two"):
        runs[name] = tmp / name
        args = ["train", "--no-progress", _empty_config(tmp),
                *tiny_run_config(tiny_model_dir, runs[name], toy_plugin, **common)]
        if name == "one":
            assert main(args) == 0
        else:
            proc = torchrun(["-m", "grpo", *args])
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs["stdout"] = proc.stdout
    runs["args"] = tiny_run_config(tiny_model_dir, runs["two"], toy_plugin, **common)
    runs["tmp"] = tmp
    return runs


def test_two_ranks_reach_the_one_process_adapter(two_rank_run):
    _assert_same_adapter(_adapter(two_rank_run["one"]), _adapter(two_rank_run["two"]))


def test_two_ranks_log_the_one_process_metrics_once_from_rank_0(two_rank_run):
    one, two = _records(two_rank_run["one"]), _records(two_rank_run["two"])
    assert [r["step"] for r in two if "reward/mean" in r] == [1, 2, 3]  # one line per step, not per rank
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        for key in ("reward/mean", "reward/std", "train/accuracy", "completion_length", "zero_variance_groups",
                    "tokens/generated", "sequences_in_loss", "tokens_in_loss", "heldout/accuracy", "heldout/reward/mean",
                    "heldout/greedy_accuracy", "heldout/completion_length", "dynamic_sampling/rounds",
                    "dynamic_sampling/kept_groups"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), key
        for key in ("loss", "kl", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-7), key
    assert two_rank_run["stdout"].count("run directory:") == 1
    samples = (two_rank_run["two"] / "eval" / "samples-step000003.jsonl").read_text().splitlines()
    assert len(samples) == 3 * (2 + 1)  # problems x (samples + greedy), gathered from both ranks
    order = [[(r["mode"], r["problem"], r["sample"]) for r in map(json.loads, (two_rank_run[name] / "eval" /
              "samples-step000003.jsonl").read_text().splitlines())] for name in ("one", "two")]
    assert order[0] == order[1]  # the file as one process writes it (the ranks' slices were interleaved)
    assert [p.name for p in sorted((two_rank_run["two"] / "checkpoints").iterdir())] == ["step-000002", "step-000003"]


def test_resume_on_two_ranks_replays_the_same_step(two_rank_run):
    run = two_rank_run["tmp"] / "resumed"
    shutil.copytree(two_rank_run["two"], run)
    shutil.rmtree(run / "checkpoints" / "step-000003")  # as if killed after step 2's checkpoint
    args = [a if not a.startswith("output_dir=") else f"output_dir={run}" for a in two_rank_run["args"]]
    proc = torchrun(["-m", "grpo", "train", "--no-progress", "--resume", _empty_config(two_rank_run["tmp"]), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and proc.stderr.count("resumed from") == 1
    _assert_same_adapter(_adapter(two_rank_run["two"]), _adapter(run), rtol=1e-6)
    assert [r["step"] for r in _records(run) if "reward/mean" in r] == [1, 2, 3]


def test_fsdp2_run_reaches_the_one_process_adapter(two_rank_run, tiny_model_dir, toy_plugin):
    """FSDP2 end to end: generation with gathered layers, split evaluation, gathered checkpoints."""
    run = two_rank_run["tmp"] / "fsdp2"
    args = [a if not a.startswith("output_dir=") else f"output_dir={run}" for a in two_rank_run["args"]]
    proc = torchrun(["-m", "grpo", "train", "--no-progress", _empty_config(two_rank_run["tmp"]), *args,
                     "distributed.strategy=fsdp2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_adapter(_adapter(two_rank_run["one"]), _adapter(run))
    state = checkpoint.read_state(run / "checkpoints" / "step-000003")
    assert state["optimizer"]["state"], "the gathered optimizer state is empty"


def test_fsdp2_evaluation_with_fewer_problems_than_ranks(tiny_model_dir, toy_plugin, tmp_path):
    """One held-out problem on two ranks: rank 1 evaluates nothing but still takes part in FSDP2's
    all-gather of the layers (it had skipped it: mismatched collectives, which gloo reports and
    NCCL would hang on). With model.device=auto, the default, which no other launch test uses."""
    run = tmp_path / "run"
    args = tiny_run_config(tiny_model_dir, run, toy_plugin, **{"steps": 1, "rollout.prompts_per_step": 2,
                                                                "eval.num_problems": 1, "eval.num_samples": 2,
                                                                "distributed.strategy": "fsdp2",
                                                                "distributed.timeout_s": 60,
                                                                "model.device": "auto"})  # the default, end to end
    proc = torchrun(["-m", "grpo", "train", "--no-progress", _empty_config(tmp_path), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (0, 1):
        assert len((run / "eval" / f"samples-step{step:06d}.jsonl").read_text().splitlines()) == 1 * (2 + 1)


def test_prompts_not_divisible_by_ranks_is_one_error_line(tiny_model_dir, toy_plugin, tmp_path):
    args = tiny_run_config(tiny_model_dir, tmp_path / "run", toy_plugin, **{"rollout.prompts_per_step": 3})
    proc = torchrun(["-m", "grpo", "train", "--no-progress", _empty_config(tmp_path), *args])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("rollout.prompts_per_step (3) must be divisible by the number of ranks (2)" in e
                          for e in errors)
    # (no assertion on tracebacks: torchrun stops the other rank with SIGTERM, which may print one)


FAILING_PLUGIN = '''
import os, time
import grpo.trainer

if os.environ.get("RANK") == "1":
    def _update(self, rollout):
        if os.environ["GRPO_TEST_FAILURE"] == "stall":
            time.sleep(120)
        raise RuntimeError("injected failure on rank 1")
    grpo.trainer.Trainer._update = _update
'''


@pytest.mark.parametrize("failure", ["raise", pytest.param("stall", marks=pytest.mark.slow)])
def test_a_failing_rank_ends_the_job_with_its_error(tiny_model_dir, toy_plugin, tmp_path, monkeypatch, failure):
    """A rank that raises takes the job down with its message; one that stalls trips the collective timeout."""
    plugin = tmp_path / "failing.py"
    plugin.write_text(FAILING_PLUGIN)
    monkeypatch.setenv("GRPO_TEST_FAILURE", failure)
    args = tiny_run_config(tiny_model_dir, tmp_path / "run", toy_plugin, **{
        "plugins": f"[{toy_plugin}, {plugin}]", "eval.at_start": "false", "distributed.timeout_s": 10})
    start = time.monotonic()
    proc = torchrun(["-m", "grpo", "train", "--no-progress", _empty_config(tmp_path), *args], timeout=100)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    if failure == "raise":
        assert "rank 1/2 failed: RuntimeError: injected failure on rank 1" in proc.stderr
        # the healthy rank says whose failure it was (or torchrun stopped it first), never that it failed
        assert "rank 0/2 failed" not in proc.stderr
    else:  # rank 0 waits in a collective for at most distributed.timeout_s, then fails the job
        assert "rank 0/2 failed" in proc.stderr and "Timed out" in proc.stderr
    assert elapsed < 90


def test_rank_batches_concatenate_to_the_one_process_numbers():
    """What each rank scored, gathered, gives the one-process metrics: logged values weighted by how
    many there were, correlations over the whole batch, error and call counts summed."""
    from grpo.rewards import RewardBatch
    from grpo.trainer import concat_scores, slice_scores

    whole = RewardBatch([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], {"rm": [0.9, 0.1, 0.8, 0.3, 0.2, 0.7],
                                                        "check": [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]},
                        {"rm": [""] * 6, "check": [""] * 6}, [True, False, True, True, False, True],
                        {"check": 1}, [("rm", "check")], {"m": (6.0, 4)}, {"check": 6})
    rank0 = RewardBatch(whole.total[:2], {k: v[:2] for k, v in whole.per_verifier.items()},
                        {k: v[:2] for k, v in whole.reasons.items()}, whole.correct[:2], {"check": 1},
                        [("rm", "check")], {"m": (1.0, 1)}, {"check": 2})
    rank1 = RewardBatch(whole.total[2:], {k: v[2:] for k, v in whole.per_verifier.items()},
                        {k: v[2:] for k, v in whole.reasons.items()}, whole.correct[2:], {},
                        [("rm", "check")], {"m": (5.0, 3)}, {"check": 4})
    groups = [slice_scores(rank0, 0, 2), slice_scores(rank1, 0, 2), slice_scores(rank1, 2, 2)]
    gathered = concat_scores(groups)
    assert gathered.metrics() == pytest.approx(whole.metrics())
    assert gathered.metrics()["reward_metric/m"] == 1.5  # not (1.0 + 5/3) / 2
    assert (gathered.errors, gathered.calls) == ({"check": 1}, {"check": 6})


def test_vllm_server_mode_other_ranks_adopt_rank_0s_adapter(tmp_path, monkeypatch):
    """One server for all ranks: a rank other than 0 publishes nothing, takes rank 0's adapter
    (a broadcast) and does not delete it on close."""
    from types import SimpleNamespace

    import grpo.dist
    from grpo.engines import vllm as vllm_engine

    class FakeServer(vllm_engine.ServerBackend):
        def __init__(self):
            self.activated = []

        def activate(self, adapter, previous):
            self.activated.append(adapter)

        def close(self):
            pass

    published = vllm_engine.Adapter("grpo-rank0-v3", 3, tmp_path / "grpo-rank0-v3")
    published.path.mkdir()
    monkeypatch.setattr(grpo.dist, "info", lambda: dist.DistInfo(1, 2))
    monkeypatch.setattr(grpo.dist, "broadcast_object", lambda obj, src=0: published)
    backend = FakeServer()
    tokenizer = SimpleNamespace(eos_token_id=2)
    engine = vllm_engine.VLLMEngine(backend, torch.nn.Linear(1, 1), tokenizer,
                                    adapter_dir=str(tmp_path))
    engine.sync_weights()
    assert engine.adapter == published and backend.activated == []
    engine.close()
    assert published.path.is_dir()


def _joining_without_a_group(monkeypatch, rank: int, world: int, cuda: bool) -> dict:
    """dist.init under a launcher's variables with torch's process-group calls recorded, not made:
    the dict gets "group" (backend, keyword arguments) and, with CUDA, "current" (set_device's)."""
    calls = {}
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("current", d))
    monkeypatch.setattr(dist.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.tdist, "init_process_group", lambda backend, **kw: calls.setdefault("group", (backend, kw)))
    monkeypatch.setattr(dist, "info", lambda: "joined")
    monkeypatch.setattr(dist, "_joined", False)
    return calls


def test_a_cuda_rank_binds_its_gpu_for_nccl(monkeypatch):
    """Under a launcher with CUDA: NCCL, cuda:LOCAL_RANK (modulo the GPUs the process sees: srun
    --gpus-per-task=1 shows each rank one device) set as current and given to the process group."""
    calls = _joining_without_a_group(monkeypatch, 3, 4, cuda=True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist.init(10, "auto") == "joined"
    backend, kw = calls["group"]
    assert calls["current"] == torch.device("cuda", 1) and backend == "nccl" and kw["device_id"] == torch.device("cuda", 1)


def test_the_default_device_under_a_launcher_joins_with_gloo_without_cuda(monkeypatch):
    """model.device=auto (the default) under torchrun on a machine without CUDA: gloo. (An import
    statement inside init once made `torch` a local name there: auto raised UnboundLocalError,
    and the tests, all with model.device=cpu, did not see it.)"""
    calls = _joining_without_a_group(monkeypatch, 1, 2, cuda=False)
    assert dist.init(10, "auto") == "joined"
    assert calls["group"][0] == "gloo" and "device_id" not in calls["group"][1]


def test_launch_settings_that_cannot_work_are_one_line_errors(monkeypatch):
    from grpo.parallel import _decoder_layers

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="every rank on the same GPU"):
        dist.init(10, "cuda:0")
    with pytest.raises(UserError, match="cannot find the decoder layers"):
        _decoder_layers(torch.nn.Linear(2, 2))
