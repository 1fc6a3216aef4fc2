"""Lineage: demo-data -> embed -> filter -> dedup -> reshard leaves one chained lineage.json beside the final
shards, each stage once, with the counts the stages' own outputs report and fingerprints that follow the data.

Fingerprints are checked against the method their records name, computed here from the files (not by the code
under test); counts against filter's summary, dedup's report.json and the shards' sizes.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import one_torch_thread, shards_fingerprint
from PIL import Image

from data_tools.cli import main
from webshards.demo_data import write_demo_data
from webshards.fingerprints import describe
from webshards.layout import iter_shard, read_sizes
from webshards.lineage import chain, read_lineage

SPEC = "{00000..00002}.tar"
STAGES = ["demo-data", "embed", "filter", "dedup", "reshard"]


def run(*args: str) -> None:
    assert main(list(args)) == 0, args


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The chain on 48 demo samples in 3 shards; returns the folder of each stage's output."""
    root = tmp_path_factory.mktemp("lineage")
    write_demo_data(root / "demo", samples=48, eval_samples=0, image_size=16, samples_per_shard=16, workers=1)
    shards = str(root / "demo" / "train" / SPEC)
    with one_torch_thread():
        run(
            "embed",
            "--shards",
            shards,
            "--model",
            "tiny-clip",
            "--output",
            str(root / "emb"),
            "--batch-size",
            "48",
        )
    run("filter", "--embeddings", str(root / "emb"), "--keep-fraction", "0.5", "--min-words", "3",
        "--output", str(root / "keep.parquet"))  # fmt: skip
    run("dedup", "--shards", shards, "--method", "perceptual", "--output", str(root / "dedup"))
    reshard = ["reshard", "--shards", shards, "--keep", str(root / "keep.parquet")]
    run(*reshard, "--keep", str(root / "dedup" / "keep.parquet"), "--output", str(root / "curated"))
    return {"root": root, "train": root / "demo" / "train", "reshard": reshard}


def stages_by_name(folder: Path) -> dict[str, dict]:
    doc = json.loads((folder / "lineage.json").read_text())
    names = [stage["name"] for stage in chain(doc)]
    assert Counter(names) == Counter(set(names)), names  # each stage once
    return {stage["name"]: stage for stage in chain(doc)}


def file_fingerprint(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_final_shards_carry_the_whole_chain_with_the_stages_counts(made: dict) -> None:
    root = made["root"]
    stages = stages_by_name(root / "curated")
    assert (
        list(stages) == STAGES
    )  # parents first: demo-data, then embed, filter, dedup (either order), reshard
    summary = json.loads((root / "keep_summary.json").read_text())
    report = json.loads((root / "dedup" / "report.json").read_text())
    counts = {name: stage["counts"] for name, stage in stages.items()}
    assert counts["demo-data"]["samples_out"] == 48 and counts["embed"] == {
        "samples_in": 48,
        "samples_out": 48,
    }
    assert counts["filter"]["samples_in"] == summary["samples"] == 48
    assert (
        counts["filter"]["samples_out"] == summary["kept"]
        and counts["filter"]["removed"] == summary["failed_rule"]
    )
    assert counts["filter"]["score_threshold"] == summary["score_threshold"]
    assert {k: counts["dedup"][k] for k in ("groups", "removed")} == {
        k: report[k] for k in ("groups", "removed")
    }
    assert counts["dedup"]["samples_out"] == report["kept"]
    assert counts["reshard"]["samples_in"] == 48
    assert counts["reshard"]["samples_out"] == sum(read_sizes(root / "curated").values())
    assert (
        stages["filter"]["params"]["keep_fraction"] == 0.5
        and stages["dedup"]["params"]["threshold_bits"] == 10
    )
    assert stages["reshard"]["command"][:2] == ["data-tools", "reshard"]


def test_inputs_are_fingerprinted_by_their_documented_method_and_linked_to_their_parents(made: dict) -> None:
    root = made["root"]
    stages = stages_by_name(root / "curated")
    ids = {name: stage["id"] for name, stage in stages.items()}
    train, keep, dedup_keep = stages["reshard"]["inputs"]  # in the order of the command line
    assert (train["role"], train["kind"], train["samples"]) == ("shards", "shards", 48)
    assert train["fingerprint"] == shards_fingerprint(made["train"])
    assert train["parents"] == [ids["demo-data"]] and train["matches_parent"]
    assert keep["fingerprint"] == file_fingerprint(root / "keep.parquet") and keep["parents"] == [
        ids["filter"]
    ]
    assert dedup_keep["fingerprint"] == file_fingerprint(root / "dedup" / "keep.parquet")
    assert dedup_keep["parents"] == [ids["dedup"]] and keep["matches_parent"] and dedup_keep["matches_parent"]
    assert stages["filter"]["inputs"][0]["parents"] == [ids["embed"]]
    assert stages["reshard"]["parents"] == [ids["demo-data"], ids["filter"], ids["dedup"]]


def test_a_changed_input_changes_its_fingerprint(made: dict, tmp_path: Path) -> None:
    copy = tmp_path / "train"
    shutil.copytree(made["train"], copy)
    before = describe("shards", str(copy / SPEC))[0]["fingerprint"]
    assert before == shards_fingerprint(made["train"])  # the content, not the place
    with (copy / "00001.tar").open("ab") as f:
        f.write(b"\0" * 512)  # one more (empty) tar block: the same samples, other bytes
    assert describe("shards", str(copy / SPEC))[0]["fingerprint"] != before
    keep = tmp_path / "keep.parquet"
    uids = pq.read_table(made["root"] / "keep.parquet")["uid"].to_pylist()
    pq.write_table(pa.table({"uid": uids[1:]}), keep)
    assert (
        describe("keep", keep)[0]["fingerprint"]
        == file_fingerprint(keep)
        != file_fingerprint(made["root"] / "keep.parquet")
    )


def test_rerunning_stages_keeps_one_entry_each(made: dict) -> None:
    root = made["root"]
    before = stages_by_name(root / "curated")
    run("filter", "--embeddings", str(root / "emb"), "--keep-fraction", "0.5", "--min-words", "3",
        "--output", str(root / "keep.parquet"))  # fmt: skip
    run(*made["reshard"], "--keep", str(root / "dedup" / "keep.parquet"), "--output", str(root / "curated"))
    after = stages_by_name(root / "curated")
    assert {n: s["id"] for n, s in after.items()} == {n: s["id"] for n, s in before.items()}
    doc = read_lineage(root / "curated" / "lineage.json")
    assert len(doc["ancestors"]) == len(STAGES) - 1  # demo-data reached three times, stored once


def test_the_lineage_command_prints_the_chain(made: dict, tmp_path: Path, capsys) -> None:
    root = made["root"]
    capsys.readouterr()
    assert main(["lineage", str(root / "curated")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"{i}. {name}" for i, name in enumerate(STAGES, 1)]
    summary = json.loads((root / "keep_summary.json").read_text())
    assert f"3. filter: 48 -> {summary['kept']} samples; keep_fraction=0.5, min_words=3" in lines[2]
    assert main(["lineage", str(root / "keep.parquet"), "--json"]) == 0  # a file: STEM_lineage.json beside it
    assert json.loads(capsys.readouterr().out) == json.loads((root / "keep_lineage.json").read_text())
    assert main(["lineage", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"data-tools: error: no lineage recorded for {tmp_path} (looked for {tmp_path / 'lineage.json'})"
    ]


def test_eval_set_decontaminate_and_metaclip_record_themselves(made: dict, tmp_path: Path) -> None:
    """Two training images copied into an eval set: decontaminate's lineage says so, with the eval set's own
    lineage as a parent; metaclip's counts are its report's."""
    shards, tree = made["reshard"][2], tmp_path / "tree"
    for i, sample in enumerate(list(iter_shard(made["train"] / "00000.tar"))[:2]):
        (tree / "seen").mkdir(parents=True, exist_ok=True)
        (tree / "seen" / f"{i}.jpg").write_bytes(sample["jpg"])
    (tree / "unseen").mkdir()
    Image.new("RGB", (20, 20), "white").save(tree / "unseen" / "white.png")
    run("eval-set", "--input", str(tree), "--output", str(tmp_path / "evalset"))
    run("decontaminate", "--shards", shards, "--eval-set", str(tmp_path / "evalset"), "--method", "exact",
        "--output", str(tmp_path / "clean"))  # fmt: skip
    stages = stages_by_name(tmp_path / "clean")
    report = json.loads((tmp_path / "clean" / "report.json").read_text())
    counts = stages["decontaminate"]["counts"]
    assert counts["eval_images_in_training"] == {str(tmp_path / "evalset"): 2} and report["removed"] >= 2
    assert (counts["removed"], counts["samples_out"]) == (report["removed"], report["kept"])
    assert stages["eval-set"]["counts"]["samples_out"] == 3
    assert stages["decontaminate"]["inputs"][1]["parents"] == [stages["eval-set"]["id"]]

    (tmp_path / "entries.txt").write_text("red\nblue\nsquare\n")
    run("metaclip", "--shards", shards, "--entries", str(tmp_path / "entries.txt"), "--t", "4",
        "--output", str(tmp_path / "mc.parquet"))  # fmt: skip
    summary = json.loads((tmp_path / "mc_entry_counts.json").read_text())
    metaclip = read_lineage(tmp_path / "mc_lineage.json")["stage"]
    assert (
        metaclip["counts"]["samples_out"] == summary["kept"]
        and metaclip["counts"]["matched"] == summary["matched"]
    )
    assert metaclip["inputs"][1]["fingerprint"] == file_fingerprint(tmp_path / "entries.txt")
