"""Human pairs as users have them: COCO's own ``captions_*2017.json`` and Karpathy's
``dataset_coco.json``, ingested with known images, captions, splits and quarantine records."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from blip_core.cli import main
from blip_core.data.formats import HumanImage, load_karpathy_entries, read_karpathy, split_from_name
from blip_core.data.ingest import ingest_human
from blip_core.errors import UsageError


def _jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    """Writes a small JPEG at ``path`` and returns its bytes."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]


CAPTIONS_VAL = {
    "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
    "licenses": [{"id": 4, "name": "Attribution License", "url": "http://creativecommons.org/licenses/by/2.0/"}],
    "images": [
        {"license": 4, "file_name": "000000000139.jpg", "coco_url": "http://images.cocodataset.org/val2017/"
         "000000000139.jpg", "height": 30, "width": 40, "date_captured": "2013-11-21 01:34:01", "id": 139},
        {"license": 4, "file_name": "000000000285.jpg", "height": 30, "width": 40, "id": 285},
        {"license": 4, "file_name": "000000000632.jpg", "height": 30, "width": 40, "id": 632},
    ],
    "annotations": [
        {"image_id": 139, "id": 370, "caption": "A woman stands in the dining area at the table."},
        {"image_id": 285, "id": 584,
         "caption": "A big burly grizzly bear is show with grass in the background."},
        {"image_id": 139, "id": 696, "caption": "Une femme à table, «café» ☕ "},
        {"image_id": 999, "id": 801, "caption": "A caption of an image that is not listed."},
        {"image_id": 285, "id": 902, "caption": "The large brown bear has a black nose."},
    ],
}
"""A ``captions_val2017.json`` with one dangling annotation (image 999) and an image without
captions (632); captions are grouped per image in annotation order."""


@pytest.fixture()
def coco(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """(``annotations/captions_val2017.json``, the ``val2017/`` image folder, file bytes by name)."""
    root = tmp_path / "coco"
    images = {name: _jpeg(root / "val2017" / name, color)
              for name, color in (("000000000139.jpg", (200, 30, 30)), ("000000000285.jpg", (30, 200, 30)),
                                  ("000000000632.jpg", (30, 30, 200)))}
    ann = root / "annotations" / "captions_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(CAPTIONS_VAL, ensure_ascii=False), encoding="utf-8")
    return ann, root / "val2017", images


def test_coco_captions_group_by_image_with_the_split_from_the_file_name(
    coco: tuple[Path, Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ann, image_root, images = coco
    out = tmp_path / "human"
    assert main(["ingest", str(ann), "--image-root", str(image_root), "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads((out / "annotations.json").read_text(encoding="utf-8")) == [
        {"image": "000000000139.jpg", "split": "val", "image_id": "139",
         "caption": ["A woman stands in the dining area at the table.", "Une femme à table, «café» ☕"]},
        {"image": "000000000285.jpg", "split": "val", "image_id": "285",
         "caption": ["A big burly grizzly bear is show with grass in the background.",
                     "The large brown bear has a black nose."]},
    ]
    assert sorted(p.name for p in out.glob("*.jpg")) == ["000000000139.jpg", "000000000285.jpg"]
    assert all((out / name).read_bytes() == images[name] for name in ("000000000139.jpg", "000000000285.jpg"))
    assert _records(out) == [
        {"key": "999", "source": "captions_val2017.json:3", "reason": "missing_field",
         "detail": "annotations[3] (id 801): image_id 999 is not in 'images'"},
        {"key": "632", "source": "captions_val2017.json:2", "reason": "missing_caption",
         "detail": "no captions"},
    ]
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["kept"], stats["quarantined"]) == (2, 2)
    assert stats["by_reason"] == {"missing_caption": 1, "missing_field": 1}
    assert stats["splits"] == {"train": 0, "val": 2, "test": 0}


def test_coco_split_option_overrides_the_file_name(
    coco: tuple[Path, Path, dict[str, bytes]], tmp_path: Path
) -> None:
    ann, image_root, _ = coco
    out = tmp_path / "human"
    argv = ["ingest", str(ann), "--image-root", str(image_root), "--out", str(out)]
    assert main([*argv, "--split", "test"]) == 0
    assert [im.split for im in read_karpathy(out / "annotations.json")] == ["test", "test"]
    stats = ingest_human(ann, image_root, tmp_path / "lib", default_split="train")
    assert stats.splits == {"train": 2, "val": 0, "test": 0}


def test_coco_without_split_in_name_or_option_asks_for_split(
    coco: tuple[Path, Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ann, image_root, _ = coco
    renamed = ann.rename(ann.with_name("captions_2017.json"))
    out = tmp_path / "human"
    argv = ["ingest", str(renamed), "--image-root", str(image_root), "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"blip-core ingest: error: {renamed}: COCO captions_*.json has no split field and its name "
        "names none: give the split (blip-core ingest --split train|val|test)\n")
    assert not out.exists()
    assert main([*argv, "--split", "val"]) == 0
    assert [im.image_id for im in read_karpathy(out / "annotations.json")] == ["139", "285"]


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("captions_train2017.json", "train"),
        ("captions_val2017.json", "val"),
        ("image_info_test2017.json", "test"),
        ("annotations/captions_val2014.json", "val"),
        ("coco-test.json", "test"),
        ("captions_trainval2014.json", None),
        ("dataset_coco.json", None),
        ("interval_captions.json", None),
    ],
)
def test_split_read_from_the_file_name(name: str, split: str | None) -> None:
    assert split_from_name(name) == split


def test_read_karpathy_reads_coco_captions_and_refuses_a_dangling_annotation(tmp_path: Path) -> None:
    clean = {**CAPTIONS_VAL, "images": CAPTIONS_VAL["images"][:2],
             "annotations": [a for a in CAPTIONS_VAL["annotations"] if a["image_id"] != 999]}
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps(clean))
    assert read_karpathy(path) == [
        HumanImage("000000000139.jpg", ("A woman stands in the dining area at the table.",
                                        "Une femme à table, «café» ☕ "), "train", "139"),
        HumanImage("000000000285.jpg", ("A big burly grizzly bear is show with grass in the background.",
                                        "The large brown bear has a black nose."), "train", "285"),
    ]
    clean["images"] = CAPTIONS_VAL["images"][1:2]
    path.write_text(json.dumps(clean))
    with pytest.raises(ValueError, match=r"annotations\[0\] \(id 370\): image_id 139 is not in 'images'"):
        read_karpathy(path)


DATASET_COCO = {
    "dataset": "coco",
    "images": [
        {"filepath": "val2014", "sentids": [770337, 771687], "filename": "COCO_val2014_000000391895.jpg",
         "imgid": 0, "split": "test", "cocoid": 391895,
         "sentences": [
             {"tokens": ["a", "man"], "raw": "A man with a red helmet on a small moped on a dirt road. ",
              "imgid": 0, "sentid": 770337},
             {"tokens": ["man"], "raw": "Man riding a motor bike on a dirt road on the countryside.",
              "imgid": 0, "sentid": 771687}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000522418.jpg", "imgid": 1, "split": "restval",
         "cocoid": 522418, "sentences": [{"raw": "A woman wearing a net on her head cutting a cake. "}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000318556.jpg", "imgid": 2, "split": "train",
         "cocoid": 318556, "sentences": [{"raw": "A very clean and well decorated empty bathroom"}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000184613.jpg", "imgid": 3, "split": "val",
         "cocoid": 184613, "sentences": [{"raw": "A child holding a flowered umbrella and petting a yak."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000060623.jpg", "imgid": 4, "split": "val",
         "cocoid": 60623, "sentences": []},
    ],
}
"""Karpathy's ``dataset_coco.json`` (fields as in the original), one image without sentences."""


def test_karpathy_dataset_coco_joins_paths_and_maps_restval_to_train(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    names = [f"{e['filepath']}/{e['filename']}" for e in DATASET_COCO["images"]]
    images = {name: _jpeg(root / name, (40 * i, 90, 160)) for i, name in enumerate(names)}
    ann = tmp_path / "karpathy" / "dataset_coco.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(DATASET_COCO))
    out = tmp_path / "human"
    assert main(["ingest", str(ann), "--image-root", str(root), "--out", str(out)]) == 0
    kept = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
    assert kept == [
        {"image": "val2014/COCO_val2014_000000391895.jpg", "split": "test", "image_id": "391895",
         "caption": ["A man with a red helmet on a small moped on a dirt road.",
                     "Man riding a motor bike on a dirt road on the countryside."]},
        {"image": "val2014/COCO_val2014_000000522418.jpg", "split": "train", "image_id": "522418",
         "caption": ["A woman wearing a net on her head cutting a cake."]},
        {"image": "train2014/COCO_train2014_000000318556.jpg", "split": "train", "image_id": "318556",
         "caption": ["A very clean and well decorated empty bathroom"]},
        {"image": "val2014/COCO_val2014_000000184613.jpg", "split": "val", "image_id": "184613",
         "caption": ["A child holding a flowered umbrella and petting a yak."]},
    ]
    assert all((out / k["image"]).read_bytes() == images[k["image"]] for k in kept)
    assert _records(out) == [{"key": "60623", "source": "dataset_coco.json:4", "reason": "missing_caption",
                              "detail": "no captions"}]
    assert json.loads((out / "stats.json").read_text())["splits"] == {"train": 2, "val": 1, "test": 1}


def test_list_layout_takes_the_default_split_only_where_an_entry_has_none(tmp_path: Path) -> None:
    path = tmp_path / "coco_karpathy_val.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": "a"}, {"image": "b.jpg", "caption": "b",
                                                                    "split": "test"}]))
    assert [e["split"] for e in load_karpathy_entries(path, "val")] == ["val", "test"]
    assert [e.get("split") for e in load_karpathy_entries(path)] == [None, "test"]  # no guess from the name


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"info": {}, "licenses": []},
         "not a known layout: top level is an object, not a list (list layout), top level has no 'images' "
         "list (Karpathy dataset_coco.json), top level has no 'annotations' (COCO captions_*.json)"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}]},
         "not a known layout: top level is an object, not a list (list layout), no item of 'images' has "
         "'sentences' (Karpathy dataset_coco.json), top level has no 'annotations' (COCO captions_*.json)"),
        ([{"file_name": "a.jpg", "caption": "a"}],
         "not a known layout: entry 0 has no 'image' (list layout), top level is a list, not an object "
         "(Karpathy dataset_coco.json), top level is a list, not an object (COCO captions_*.json)"),
        ("captions",
         "not a known layout: top level is a str (list layout), top level is a str (Karpathy "
         "dataset_coco.json), top level is a str (COCO captions_*.json)"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}],
          "annotations": [{"id": 2, "image_id": 1, "bbox": [0, 0, 4, 4], "category_id": 18}]},
         "no item of 'annotations' has a 'caption': give COCO's captions_*.json, not instances_*.json "
         "or person_keypoints_*.json"),
    ],
    ids=["no-images", "coco-images-without-annotations", "list-without-image", "string", "instances"],
)
def test_unknown_layout_names_what_is_missing(
    content: object, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "annotations_val.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError) as err:
        ingest_human(path, None, tmp_path / "lib")
    assert str(err.value) == f"{path}: {message}"
    assert main(["ingest", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"blip-core ingest: error: {path}: {message}\n"
    assert not (tmp_path / "lib").exists() and not (tmp_path / "out").exists()


def test_annotation_file_that_is_not_json_is_a_usage_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "captions_val2017.json"
    path.write_bytes(b"\x89PNG\r\n")
    assert main(["ingest", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"blip-core ingest: error: {path}: not a JSON file (")
