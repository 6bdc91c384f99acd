"""`curate eval --suite`: eval sets in clip_benchmark's WebDataset layout, each with its main figure, and their mean."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curate.cli import main
from curate.train.eval_suite import multi_caption_retrieval

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}


def _png(colour: tuple[int, int, int], seed: int) -> bytes:
    pixels = np.clip(np.array(colour) + np.random.default_rng(seed).integers(-15, 15, (32, 32, 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    root = tmp_path / "suite"
    names = list(COLOURS)
    colours = root / "colours"
    _write_tar(colours / "test" / "0.tar", [{"png": _png(COLOURS[n], i), "cls": str(names.index(n)).encode()}
                                            for i, n in enumerate(names * 4)])
    (colours / "test" / "nshards.txt").write_text("1\n")
    (colours / "classnames.txt").write_text("\n".join(names) + "\n")
    (colours / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} square.\n")
    captions = root / "captions"
    _write_tar(captions / "test" / "0.tar", [{"png": _png(COLOURS[n], 100 + i),
                                              "txt": f"a {n} square\nsomething {n}\n".encode()}
                                             for i, n in enumerate(names)])
    (captions / "dataset_type.txt").write_text("retrieval\n")
    (root / "notes").mkdir()  # not a set: no test/*.tar
    return root


def test_recall_with_several_captions_per_image() -> None:
    image = np.eye(3)
    owner = np.array([0, 0, 1, 2])
    text = np.eye(3)[owner]
    assert multi_caption_retrieval(image, text, owner, ks=(1,)) == {"image_to_text_R@1": 1.0,
                                                                    "text_to_image_R@1": 1.0}
    text[3] = [0.1, 0.9, 0.2]  # image 2's only caption now sits nearest image 1, nearer than image 1's own
    text[2] = [0.5, 0.6, 0.0]
    found = multi_caption_retrieval(image, text / np.linalg.norm(text, axis=1, keepdims=True), owner, ks=(1, 3))
    assert found["text_to_image_R@1"] == 0.75 and found["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert found["text_to_image_R@3"] == 1.0 and found["image_to_text_R@3"] == 1.0


def test_a_suite_reports_each_set_and_the_mean(suite: Path, tiny_clip: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "suite.json"
    assert main(["eval", "--model", str(tiny_clip), "--suite", str(suite), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    by_set = {r["set"]: r for r in results["sets"]}
    assert sorted(by_set) == ["captions", "colours"]
    assert by_set["colours"]["kind"] == "classification" and by_set["colours"]["samples"] == 12
    assert by_set["colours"]["top5"] == 1.0 and 0 <= by_set["colours"]["top1"] <= 1  # 3 classes: always in top 5
    assert by_set["captions"]["captions"] == 6 and by_set["captions"]["image_to_text_R@10"] == 1.0
    assert results["average"] == pytest.approx((by_set["colours"]["main"] + by_set["captions"]["main"]) / 2)
    assert "average" in capsys.readouterr().out


def test_suite_errors_are_one_line(suite: Path, tiny_clip: Path, capsys) -> None:
    (suite / "colours" / "classnames.txt").unlink()
    assert main(["eval", "--model", str(tiny_clip), "--suite", str(suite)]) == 2
    assert "needs classnames.txt" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_clip), "--suite", str(suite), "--data", str(suite)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_clip), "--suite", str(suite / "notes")]) == 2
    assert "no eval sets" in capsys.readouterr().err
