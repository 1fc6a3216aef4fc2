"""Evaluation on eval sets in clip_benchmark's webdataset layout: retrieval recall on a hand-made case, and
`pretrain eval` (2 gloo ranks) and the in-loop eval (1 rank) against the same computation done with
open_clip's own helpers, the webdataset package and clip_benchmark's definitions on the exported model."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from helpers import cli_output, serve_files, torchrun, train_in_process, write_export

from pretrain.evaluation.retrieval import retrieval_recalls
from webshards.evalset import read_eval_set

TIMINGS = ("seconds", "step")


def test_retrieval_recall_hand_made_with_several_captions_per_image():
    """3 images (the unit axes) and 5 captions: image 0 has captions 0, 1; image 1 has 2; image 2 has 3, 4.
    Worked out by hand: caption -> image, the true image ranks 1, 2, 3, 1, 2 (recall@1 2/5, @2 4/5, @3 1);
    image -> captions, image 0's best caption is 0 (its own), image 1's is 1 (image 0's) then 2 (its own),
    image 2's is 3 (its own): recall@1 2/3, @2 1."""
    images = torch.eye(3)
    texts = F.normalize(
        torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0.5, 0.3, 0.8], [0, 0, 1.0], [0.8, 0, 0.6]]), dim=1
    )
    recalls = retrieval_recalls(images, texts, torch.tensor([0, 0, 1, 2, 2]), ks=(1, 2, 3))
    assert recalls == pytest.approx(
        {
            "image_retrieval_recall@1": 2 / 5,
            "image_retrieval_recall@2": 4 / 5,
            "image_retrieval_recall@3": 1.0,
            "text_retrieval_recall@1": 2 / 3,
            "text_retrieval_recall@2": 1.0,
            "text_retrieval_recall@3": 1.0,
        },
        abs=0,
    )


def test_eval_set_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nshards.txt not found"):
        read_eval_set(tmp_path)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "nshards.txt").write_text("1\n")
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {}.\n")
    with pytest.raises(ValueError, match=r"zeroshot_classification_templates.txt: template .* has no \{c\}"):
        read_eval_set(tmp_path)
    (tmp_path / "dataset_type.txt").write_text("segmentation\n")
    with pytest.raises(ValueError, match="dataset_type.txt: unknown dataset type 'segmentation'"):
        read_eval_set(tmp_path)


def test_eval_set_over_http_reads_like_local(demo_data):
    """The same set served over HTTP (the shard layer's URLs) describes the same shards by URL."""
    root = demo_data / "retrieval"
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with serve_files(files) as url:
        remote = read_eval_set(url)
        assert remote.task == "zeroshot_retrieval" and remote.spec == f"{url}/test/{{0..1}}.tar"
        with wds.WebDataset(list(remote.shards), shardshuffle=False) as dataset:
            assert len(list(dataset)) == 64


# ---- pretrain eval vs open_clip + clip_benchmark --------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_data) -> Path:
    """A tiny-clip run (in-loop eval on 1 rank at its last step) and its export."""
    tasks = ", ".join(
        f"{{name: {n}, root: {json.dumps(str(r))}}}"
        for n, r in (("zs", demo_data), ("ret", demo_data / "retrieval"))
    )
    run_dir = train_in_process(
        tmp_path_factory.mktemp("eval"),
        [
            f"data.train={demo_data}/train/{{00000..00003}}.tar",
            "train.steps=4",
            f"eval.tasks=[{tasks}]",
            f"eval.val_data={demo_data}/eval/{{00000..00000}}.tar",
            "eval.batch_size=24",
        ],  # fmt: skip
    )
    from pretrain.publish.export import export

    export(run_dir, run_dir / "export")
    return run_dir


def read_clip_benchmark(root: Path, target: str) -> list[tuple]:
    """Samples as clip_benchmark's build_wds_dataset reads them: `test/{0..N-1}.tar` from nshards.txt."""
    n = int((root / "test" / "nshards.txt").read_text())
    urls = [str(root / "test" / f"{i}.tar") for i in range(n)]
    with wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("webp;png;jpg;jpeg", target) as d:
        return list(d)


def embed_images(model, preprocess, images) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)


def reference_classification(model, preprocess, tokenizer, root: Path) -> dict:
    """open_clip's build_zero_shot_classifier with clip_benchmark's prompts; accuracy and balanced accuracy."""
    classnames = (root / "classnames.txt").read_text().splitlines()
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    samples = read_clip_benchmark(root, "cls")
    with torch.no_grad():
        prompts = [lambda c, t=t: t.format(c=c) for t in templates]
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, prompts)
        logits = 100.0 * embed_images(model, preprocess, [image for image, _ in samples]) @ classifier
    target = np.array([int(label) for _, label in samples])
    top5 = logits.topk(5, dim=1).indices.numpy()
    pred = top5[:, 0]
    recalls = [np.mean(pred[target == c] == c) for c in np.unique(target)]
    return {"top1": float(np.mean(pred == target)), "top5": float(np.mean((top5 == target[:, None]).any(1))),
            "mean_per_class_recall": float(np.mean(recalls)), "samples": len(samples)}  # fmt: skip


def reference_retrieval(model, preprocess, tokenizer, root: Path) -> dict:
    """clip_benchmark's zeroshot_retrieval: a positive-pair matrix, recall = true positives / positives in the
    top k, and a query counts as found when that recall is > 0."""
    samples = read_clip_benchmark(root, "txt")
    captions = [text.splitlines() for _, text in samples]
    texts_image_index = [i for i, lines in enumerate(captions) for _ in lines]
    images_emb = embed_images(model, preprocess, [image for image, _ in samples])
    with torch.no_grad():
        texts_emb = F.normalize(
            model.encode_text(tokenizer([c for lines in captions for c in lines])), dim=-1
        )
    scores = texts_emb @ images_emb.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), texts_image_index] = True

    def recall(s, p, k):
        onehot = F.one_hot(s.topk(k, dim=1).indices, num_classes=s.shape[1])
        return (onehot * p[:, None, :]).sum(dim=(1, 2)) / p.sum(dim=1)

    out = {}
    for k in (1, 5, 10):
        out[f"image_retrieval_recall@{k}"] = (recall(scores, positive, k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (recall(scores.T, positive.T, k) > 0).float().mean().item()
    return {**out, "samples": len(samples), "captions": len(texts_image_index)}


def reference_val_loss(model, preprocess, tokenizer, shard: Path) -> float:
    """InfoNCE over the whole held-out set at the model's scale, mean of both directions."""
    with wds.WebDataset(str(shard), shardshuffle=False).decode("pil").to_tuple("jpg", "txt") as d:
        samples = list(d)
    images = embed_images(model, preprocess, [image for image, _ in samples])
    with torch.no_grad():
        texts = F.normalize(model.encode_text(tokenizer([t for _, t in samples])), dim=-1)
        logits = model.logit_scale.exp() * images @ texts.T
    target = torch.arange(len(samples))
    return ((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2).item()


def hit_counts(metrics: dict) -> dict[str, int]:
    """Each recall as the number of queries found: text->image has a query per caption, image->text per image."""
    return {
        k: round(v * metrics["captions" if k.startswith("image_") else "samples"])
        for k, v in metrics.items()
        if "recall@" in k
    }


def without_timings(rows: list[dict]) -> dict[str, dict]:
    return {r["eval"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in rows}


def test_pretrain_eval_matches_open_clip_and_clip_benchmark_on_1_and_2_ranks(run, demo_data):
    in_loop = json.loads((run / "eval_results.json").read_text())
    metrics_lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in metrics_lines if "eval" in r] == in_loop  # the same rows, one per eval, step 4
    assert [r["eval"] for r in in_loop] == ["zs", "ret", "val"] and {r["step"] for r in in_loop} == {4}

    args = ["-m", "pretrain.cli", "eval", "--checkpoint", str(run / "export"), "--batch-size", "10",
            "--task", f"zs={demo_data}", "--task", f"ret={demo_data / 'retrieval'}",
            "--val-data", f"{demo_data}/eval/{{00000..00000}}.tar"]  # fmt: skip
    proc = torchrun(2, args, timeout=600, env={"PROGRESS_EVERY": "0"})  # a progress line at every batch
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout holds the results alone, stderr rank 0's progress of its share
    two_ranks = without_timings([json.loads(line) for line in proc.stdout.splitlines()])
    finished = [line for line in proc.stderr.splitlines() if line.endswith(", finished")]
    assert [line.split(" INFO ")[1].split(", ")[0] for line in finished] == [
        "eval zs (rank 0 of 2): 2/2 shards (100%)", "eval ret (rank 0 of 2): 1/1 shards (100%)",
        "eval val (rank 0 of 2): 1/1 shards (100%)",
    ]  # fmt: skip
    one_rank = without_timings(in_loop)
    val_one, val_two = one_rank.pop("val"), two_ranks.pop("val")
    assert two_ranks == one_rank  # exactly: counts, and recalls from the same hits

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run / 'export'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run / 'export'}")
    model.eval()
    expected = reference_classification(model, preprocess, tokenizer, demo_data)
    ours = one_rank["zs"]
    assert ours["task"] == "zeroshot_classification" and ours["samples"] == expected["samples"]
    assert (ours["top1"], ours["top5"]) == (expected["top1"], expected["top5"])  # exactly
    assert ours["mean_per_class_recall"] == pytest.approx(expected["mean_per_class_recall"], abs=1e-12)
    expected = reference_retrieval(model, preprocess, tokenizer, demo_data / "retrieval")
    ours = one_rank["ret"]
    assert ours["task"] == "zeroshot_retrieval"
    assert (ours["samples"], ours["captions"]) == (expected["samples"], expected["captions"]) == (64, 192)
    assert hit_counts(ours) == hit_counts(expected)  # exactly (clip_benchmark's means are float32)
    loss = reference_val_loss(model, preprocess, tokenizer, demo_data / "eval" / "00000.tar")
    assert val_one["val_loss_whole_set"] == pytest.approx(loss, rel=1e-5)
    assert val_one["val_loss_chance"] == pytest.approx(math.log(64))  # a model knowing nothing: log N
    assert val_two["val_loss_whole_set"] == pytest.approx(val_one["val_loss_whole_set"], rel=1e-6)
    assert val_two["samples"] == 64


def test_pretrain_eval_progress_counts_shards_and_samples(tmp_path, demo_data, capsys, caplog, monkeypatch):
    """Each eval set's progress is named after it and counted in shards (the set's size is known in shards,
    so there is an ETA) and samples: with `PROGRESS_EVERY=0` a line at every batch, up to the whole set, and a
    last one; at the default interval an eval this quick adds no line. stdout holds the results alone."""
    argv = ["eval", "--checkpoint", str(write_export(tmp_path / "export")), "--batch-size", "10",
            "--task", f"zs={demo_data}", "--task", f"ret={demo_data / 'retrieval'}"]  # fmt: skip
    monkeypatch.setenv("PROGRESS_EVERY", "0")
    with caplog.at_level(logging.INFO, logger="pretrain"):
        out = cli_output(argv, capsys)
    assert [json.loads(line)["eval"] for line in out.splitlines()] == ["zs", "ret"]
    for name, shards in (("zs", 4), ("ret", 2)):
        lines = [m for m in caplog.messages if m.startswith(f"eval {name}: ")]
        counts = [re.match(rf"eval {name}: (\d+)/{shards} shards \(\d+%\), (\d+) samples", m) for m in lines]
        done, samples = ([int(c.group(i)) for c in counts] for i in (1, 2))
        assert done == sorted(done) and sorted(set(samples)) == [10, 20, 30, 40, 50, 60, 64], lines
        assert lines[0].startswith(f"eval {name}: 0/{shards} shards (0%), 10 samples, ") and "ETA" in lines[0]
        assert lines[-1].startswith(f"eval {name}: {shards}/{shards} shards (100%), 64 samples, ")
        assert lines[-1].endswith(", finished")
    monkeypatch.delenv("PROGRESS_EVERY")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pretrain"):
        cli_output(argv, capsys)
    assert not [m for m in caplog.messages if m.startswith("eval ")]


def test_pretrain_eval_bad_task_is_one_line(tmp_path, capsys):
    from pretrain.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path), "--task", "oops"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--task needs NAME=ROOT" in err
    missing = tmp_path / "runs" / "nope"  # a path that is not there: said so, not "unknown model"
    assert main(["eval", "--checkpoint", str(missing), "--task", f"zeroshot={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err == f"pretrain eval: error: {missing}: no such checkpoint, run directory or export folder\n"
