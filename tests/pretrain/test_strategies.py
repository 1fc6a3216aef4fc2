"""FSDP2 and DeepSpeed against DDP on 2 gloo ranks: same losses, same weights, same eval; exact resume,
and an FSDP checkpoint saved at world size 2 resumes at world size 1."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import cli_output, cut_back, read_jsonl, selected, train_in_process, train_runs

from pretrain.models.build import load_trained

STEPS = 5
CUT = 2  # the interrupted runs lose everything after this step's checkpoint
RTOL = 1e-3
DEEPSPEED = [f"deepspeed{stage}" for stage in (1, 2, 3)]
STRATEGY_ARGS = {
    "ddp": ["dist.strategy=ddp"],
    "fsdp": ["dist.strategy=fsdp"],
    **{f"deepspeed{s}": ["dist.strategy=deepspeed", f"dist.zero_stage={s}"] for s in (1, 2, 3)},
}


def deepspeed_works() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


def available(strategies: list[str]) -> list[str]:
    """`strategies` less DeepSpeed's where it is not installed (their tests skip)."""
    return [s for s in strategies if deepspeed_works() or not s.startswith("deepspeed")]


def train_args(
    run_dir: Path, strategy: str, batch: int = 8, extra: tuple = (), steps: int = STEPS
) -> list[str]:
    """The overrides of configs/tiny.yaml for a run of `strategy` into `run_dir` (metrics every step)."""
    return [
        f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", f"train.steps={steps}", f"train.batch_size={batch}",
        "log.every=1", "train.precision=fp32", "checkpoint.every=2", "checkpoint.keep=5", *STRATEGY_ARGS[strategy],
        *extra,
    ]  # fmt: skip


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def assert_close_losses(a: Path, b: Path, keys: tuple[str, ...] = ("loss",), steps: int = STEPS) -> None:
    """Every logged step's value of each metric in `keys` within RTOL."""
    for key in keys:
        la, lb = losses(a, key), losses(b, key)
        assert len(la) == len(lb) == steps
        for step, (x, y) in enumerate(zip(la, lb), 1):
            assert abs(x - y) / abs(y) < RTOL, f"step {step}: {key} {x} vs {y}"


def assert_close_weights(a: Path, b: Path, tol: float = 1e-4) -> None:
    """Final weights through `load_trained` (what export and eval read), whatever the format."""
    wa, wb = load_trained(a).model.state_dict(), load_trained(b).model.state_dict()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < tol, f"max parameter difference {worst}"


def eval_tasks(demo_data: Path) -> str:
    """The demo's classification and retrieval eval sets as an `eval.tasks` override."""
    return f"eval.tasks=[{{name: zeroshot, root: {demo_data}}}, {{name: demo-retrieval, root: {demo_data}/retrieval}}]"


COCA_STEPS = 3
COCA_PARTS = ("loss", "loss_contrastive", "loss_caption")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data, request) -> dict[str, Path]:
    """Every 2-rank run of this module, in one torchrun: per strategy a finished run with a zero-shot eval
    at the end (`ddp`, `fsdp`, ...) and the same cut back after step CUT and resumed (`ddp-resumed`, ...);
    2 ranks x batch 4 tiny-coca runs of COCA_STEPS (loss.name=coca follows from the model): `coca-fsdp`, and
    when the slow comparison runs its one DDP reference `coca-ddp` and `coca-deepspeed3`."""
    root, plan, done = tmp_path_factory.mktemp("strategies"), [], {}
    for strategy in available(list(STRATEGY_ARGS)):
        straight, resumed = root / strategy, root / f"{strategy}-resumed"
        plan += [
            {"train": train_args(straight, strategy, extra=(eval_tasks(demo_data),))},
            {"cut_back": [str(straight), str(resumed), CUT]},
            {"train": train_args(resumed, strategy, extra=("resume=latest",))},
        ]
        done[strategy], done[f"{strategy}-resumed"] = straight, resumed
    coca = ["ddp", "fsdp", "deepspeed3"] if selected(request, "slow") else ["fsdp"]
    for strategy in available(coca):
        done[f"coca-{strategy}"] = root / f"coca-{strategy}"
        extra = ("model.name=tiny-coca",)
        plan.append({"train": train_args(root / f"coca-{strategy}", strategy, 4, extra, COCA_STEPS)})
    # an empty folder for torch's C++ extensions: DeepSpeed on the CPU must build none
    train_runs(plan, env={"TORCH_EXTENSIONS_DIR": str(root / "torch_extensions")})
    return done


@pytest.mark.slow
def test_deepspeed_on_the_cpu_builds_no_extension(runs):
    """DeepSpeed's shared-memory all-reduce (a C++ build of 1-2 min, only for its inference kernels) is not built
    for training on the CPU: the runs' extension folder stays empty."""
    require("deepspeed1")
    assert runs["deepspeed3"].exists()
    built = runs["ddp"].parent / "torch_extensions"
    assert not built.exists() or not any(built.iterdir()), sorted(built.iterdir())


def evals(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("eval") == "zeroshot"]


def require(strategy: str) -> None:
    if strategy.startswith("deepspeed") and not deepspeed_works():
        pytest.skip("deepspeed is not installed (pip install '.[deepspeed]')")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", *DEEPSPEED])
def test_strategy_matches_ddp(runs, strategy):
    require(strategy)
    assert_close_losses(runs[strategy], runs["ddp"])
    assert_close_weights(runs[strategy], runs["ddp"])
    (ours,), (ref,) = evals(runs[strategy]), evals(runs["ddp"])
    assert ours["top1"] == pytest.approx(ref["top1"], abs=1 / 64)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", *DEEPSPEED])
def test_resume_equals_uninterrupted(runs, strategy):
    require(strategy)
    straight, resumed = runs[strategy], runs[f"{strategy}-resumed"]
    rows = read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert_close_losses(resumed, straight)
    assert_close_weights(resumed, straight, tol=1e-5)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_at_another_world_size(runs, tmp_path):
    """Saved by 2 ranks x batch 8, resumed by 1 rank x batch 16 (in this process): the same global batches
    (DCP reshards)."""
    straight = runs["fsdp"]
    resumed = cut_back(straight, tmp_path / "fsdp-w1", CUT)
    train_in_process(tmp_path, train_args(resumed, "fsdp", batch=16, extra=("resume=latest",)), resumed.name)
    assert_close_losses(resumed, straight)
    assert_close_weights(resumed, straight)


@pytest.mark.slow
def test_fsdp_checkpoint_is_sharded_dcp(runs):
    folder = runs["fsdp"] / f"checkpoints/step_{STEPS:08d}"
    assert (folder / "dcp/.metadata").is_file()
    assert len(list((folder / "dcp").glob("*.distcp"))) == 2  # one shard file per rank
    assert not (folder / "model.safetensors").exists()
    weights = load_trained(folder).model.state_dict()
    assert weights["logit_scale"].shape == torch.Size([])  # back to open_clip's scalar


def assert_export_matches(run_dir: Path, out: Path, capsys) -> None:
    """`pretrain export` of a run directory (in this process; tests/pretrain/test_export.py runs the command)
    writes exactly the weights `load_trained` reads from the run."""
    cli_output(["export", "--checkpoint", str(run_dir), "--output", str(out)], capsys)
    exported = load_trained(out).model.state_dict()
    trained = load_trained(run_dir).model.state_dict()
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed3"])
def test_export_and_eval_read_sharded_checkpoints(runs, strategy, tmp_path, demo_data, capsys):
    """`pretrain export` / `pretrain eval` on a run directory whose checkpoints are DCP or DeepSpeed folders; the
    evaluation of the sharded model during training equals `pretrain eval` in one process, metric for metric."""
    require(strategy)
    assert_export_matches(runs[strategy], tmp_path / "export", capsys)
    tasks = ["--task", f"zeroshot={demo_data}", "--task", f"demo-retrieval={demo_data}/retrieval"]
    out = cli_output(["eval", "--checkpoint", str(runs[strategy]), *tasks], capsys)
    lines = [line for line in out.splitlines() if line.startswith("{")]  # DeepSpeed prints to stdout too
    printed = {r["eval"]: r for r in map(json.loads, lines)}
    # the sharded model's own eval at the end of training (2 ranks) gives exactly what one process gives
    in_loop = {r["eval"]: r for r in read_jsonl(runs[strategy] / "metrics.jsonl") if "eval" in r}
    assert printed.keys() == in_loop.keys() == {"zeroshot", "demo-retrieval"}
    for name, result in printed.items():
        metrics = {k: v for k, v in result.items() if k not in ("seconds", "step")}
        assert metrics == {k: in_loop[name][k] for k in metrics}, name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed3"])
def test_coca_strategy_matches_ddp(runs, strategy):
    """Sharded CoCa (text tower, cross-attention decoder blocks, the caption loss over the global token
    count) trains like DDP: both loss parts at every step, and the weights that export and eval read."""
    require(strategy)
    assert_close_losses(runs[f"coca-{strategy}"], runs["coca-ddp"], COCA_PARTS, COCA_STEPS)
    assert_close_weights(runs[f"coca-{strategy}"], runs["coca-ddp"])


@pytest.mark.slow
def test_export_reads_a_coca_fsdp_run(runs, tmp_path, capsys):
    """A CoCa run's DCP checkpoint exports to open_clip's layout as a CoCa (decoder included)."""
    assert_export_matches(runs["coca-fsdp"], tmp_path / "export", capsys)
    assert isinstance(load_trained(tmp_path / "export").model, open_clip.CoCa)


def test_deepspeed_config_from_keys_or_a_file(tmp_path):
    from pretrain.config import DistConfig, TrainConfig
    from pretrain.parallel.deepspeed import build_deepspeed_config

    train = TrainConfig(batch_size=8, precision="bf16", grad_clip=0.5)
    config = build_deepspeed_config(DistConfig(strategy="deepspeed", zero_stage=3, offload=True), train, 4)
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert config["bf16"] == {"enabled": True} and config["gradient_clipping"] == 0.5
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (8, 32)
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}, "train_batch_size": 999}')
    config = build_deepspeed_config(DistConfig(strategy="deepspeed", deepspeed_config=str(path)), train, 4)
    assert config["zero_optimization"] == {"stage": 2} and config["train_batch_size"] == 32


def test_activation_checkpointing_keeps_the_gradients():
    """Transforms run before sharding in every strategy; recomputing blocks must not change gradients."""
    from pretrain.config import DistConfig, ModelConfig
    from pretrain.models.build import build_model
    from pretrain.parallel.base import Strategy

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Strategy(DistConfig(activation_checkpointing=checkpointing)).wrap(
            build_model(ModelConfig()).model, torch.device("cpu")
        )
        assert (
            model.visual.transformer.grad_checkpointing
            == model.transformer.grad_checkpointing
            == checkpointing
        )
        images, texts = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4, 32))
        image_f, text_f, scale = model(images, texts)[:3]
        (scale * image_f @ text_f.T).logsumexp(1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
