"""pipeline export: the ONNX and TorchScript files give the project's probabilities without the project."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, one_line_error, run_cli, run_json, shared_dataset

ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")
from bench.onnx_predict import crop as pillow_crop  # noqa: E402  (the README snippet's preprocessing, as a function)

pytestmark = pytest.mark.slow  # every test here runs the CLI on images or kills processes


def project_features(run, crops: np.ndarray):
    """The project's own path on ready crops: DALI's normalization, the fp32 backbone runner; with the run's head."""
    from stages.model import ImageClassifier, load_run

    backbone, head, config = load_run(run)
    model = ImageClassifier(backbone, head, config.classes, precision="fp32", device="cpu")
    pre = backbone.preprocessing
    x = (torch.from_numpy(crops).float() - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    with torch.no_grad():
        return model, model.features(x.permute(0, 3, 1, 2))


def project_probabilities(run, crops: np.ndarray) -> np.ndarray:
    model, features = project_features(run, crops)
    with torch.no_grad():
        return torch.softmax(model.head(features), dim=1).numpy()


def project_familiarity(run, crops: np.ndarray) -> np.ndarray:
    """The run's familiarity (stages.familiarity) of the crops' features."""
    from stages.familiarity import load_familiarity

    _, features = project_features(run, crops)
    return load_familiarity(run)(features).numpy()


def onnx_probabilities(path, crops: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path))
    return session.run(["probabilities"], {"images": crops})[0]


def test_onnx_file_gives_the_projects_probabilities_on_the_same_crops(trained, tmp_path):
    data, _, run = trained
    result = run_json("export", run, "--out", tmp_path / "model.onnx")
    assert result["format"] == "onnx" and (tmp_path / "model.onnx").stat().st_size == result["bytes"]
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob(".*"))  # one file, no temporaries left
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    [images], [probs, familiar] = session.get_inputs(), session.get_outputs()
    assert (images.name, images.type, images.shape[1:]) == ("images", "tensor(uint8)", [224, 224, 3])
    assert probs.name == "probabilities" and probs.type == "tensor(float)" and isinstance(images.shape[0], str)
    assert familiar.name == "familiarity" and familiar.type == "tensor(float)"
    meta = session.get_modelmeta().custom_metadata_map
    config = json.loads((run / "config.json").read_text())
    assert json.loads(meta["classes"]) == config["classes"] == ["a", "b", "c"]
    assert (
        meta["weights_sha256"] == config["feature_set"]["weights_sha256"] and meta["backbone"] == "efficientnet_lite0"
    )
    prep = json.loads(meta["preprocessing"])
    assert (prep["resize"], prep["crop"]) == (256, 224) and meta["pipeline_version"]
    files = sorted((data / "valid").rglob("*.jpg"))
    crops = np.stack([pillow_crop(f, prep["resize"], prep["crop"]) for f in files])
    expected = project_probabilities(run, crops)
    for batch in (crops[:1], crops[:5], crops):  # the batch dimension is dynamic
        got = onnx_probabilities(tmp_path / "model.onnx", batch)
        np.testing.assert_allclose(got, expected[: len(batch)], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
    assert (got.argmax(1) == [("abc".index(f.parent.name)) for f in files]).mean() == 1.0
    scores = ort.InferenceSession(str(tmp_path / "model.onnx")).run(["familiarity"], {"images": crops})[0]
    np.testing.assert_allclose(scores, project_familiarity(run, crops), atol=1e-4, rtol=0)
    threshold = json.loads((run / "metrics.json").read_text())["familiarity"]["threshold"]
    assert float(meta["familiarity_threshold"]) == pytest.approx(threshold, abs=1e-6)


def test_torchscript_file_agrees_and_carries_the_metadata(trained, tmp_path):
    data, _, run = trained
    result = run_json("export", run, "--format", "torchscript")
    assert result["out"] == str(run / "model.pt")
    extra = {"classes.txt": "", "preprocessing.txt": ""}
    module = torch.jit.load(result["out"], _extra_files=extra)
    assert json.loads(extra["classes.txt"]) == ["a", "b", "c"]
    files = sorted((data / "valid").rglob("*.jpg"))[:4]
    crops = np.stack([pillow_crop(f, 256, 224) for f in files])
    with torch.no_grad():
        got, scores = module(torch.from_numpy(crops))
    np.testing.assert_allclose(got.numpy(), project_probabilities(run, crops), atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores.numpy(), project_familiarity(run, crops), atol=1e-4, rtol=0)


def test_fine_tuned_run_exports_its_own_backbone(trained, tmp_path):
    data, _, run = trained
    run_json(
        "finetune",
        data,
        "--head",
        run,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--no-keep-best",
        "--out",
        tmp_path / "ft",
    )
    # TorchScript: the same module as the ONNX file, and faster to export than ONNX's dynamo path.
    run_json("export", tmp_path / "ft", "--format", "torchscript", "--out", tmp_path / "ft.pt")
    meta = {"weights_sha256.txt": ""}
    module = torch.jit.load(tmp_path / "ft.pt", _extra_files=meta)
    meta = {k: v.decode() for k, v in meta.items()}
    assert (
        meta["weights_sha256.txt"]
        == json.loads((tmp_path / "ft/config.json").read_text())["feature_set"]["weights_sha256"]
    )
    assert meta["weights_sha256.txt"] != json.loads((run / "config.json").read_text())["feature_set"]["weights_sha256"]
    crops = np.stack([pillow_crop(f, 256, 224) for f in sorted((data / "valid").rglob("*.jpg"))[:3]])
    with torch.no_grad():
        got, scores = module(torch.from_numpy(crops))  # a fine-tuned run carries its own familiarity
    np.testing.assert_allclose(got.numpy(), project_probabilities(tmp_path / "ft", crops), atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores.numpy(), project_familiarity(tmp_path / "ft", crops), atol=1e-4, rtol=0)


def test_export_errors_are_one_line(trained, tmp_path):
    _, _, run = trained
    one_line_error(run_cli("export", tmp_path, check=False), str(tmp_path), "not a head run")
    one_line_error(
        run_cli("export", run, "--out", tmp_path / "missing" / "m.onnx", check=False), "--out", "does not exist"
    )
    one_line_error(run_cli("export", run, "--out", tmp_path, check=False), "--out", "is a folder")
    one_line_error(run_cli("export", run, "--format", "tflite", check=False), "--format", "onnx, torchscript")
    # Without the extra: the same CLI in a process where the exporter's packages cannot be imported.
    blocked = (
        "import sys; sys.modules.update(onnx=None, onnxscript=None); sys.argv = ['pipeline', 'export', "
        f"{str(run)!r}, '--out', {str(tmp_path / 'm.onnx')!r}]; from pipeline.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=REPO)
    one_line_error(proc, "onnx, onnxscript", "pip install -e '.[export]'")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.shared_data
def readme_snippet() -> str:
    return re.search(r"<!-- export-snippet -->\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)[1]


def test_readme_snippet_crops_before_it_resizes(trained, tmp_path):
    """A 1 x 20000 PNG through the README's snippet, verbatim: it answers in little memory (resizing the whole image
    first took 5.4 GB), and its crop is the one a resize of the whole image gives, within one grey level."""
    from PIL import Image

    _, _, run = trained
    run_json("export", run, "--out", tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20000, 1, 3), dtype=np.uint8)).save(tmp_path / "tall.png")
    photo = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    (tmp_path / "snippet.py").write_text(readme_snippet())

    def peak_mb(code: str) -> int:
        measure = (
            f"import resource, runpy, sys; {code}; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
        )
        proc = subprocess.run([sys.executable, "-c", measure], capture_output=True, text=True, cwd=tmp_path, check=True)
        return int(proc.stdout.split()[-1])

    def snippet(image: str) -> str:
        return f"sys.argv = ['snippet.py', '{image}']; runpy.run_path('snippet.py')"

    def as_function(image: str) -> str:  # bench/onnx_predict.py's crop, the snippet's steps as a function
        return f"sys.path.insert(0, {str(REPO)!r}); from bench.onnx_predict import crop; crop('{image}', 256, 224)"

    for run_it in (snippet, as_function):  # the model's session is most of the snippet's memory, either way
        assert peak_mb(run_it("tall.png")) < peak_mb(run_it("photo.png")) + 100, run_it.__name__
    whole = photo.resize((256 * 451 // 300, 256), Image.BILINEAR)
    left, top = round((whole.width - 224) / 2), round((whole.height - 224) / 2)
    expected = np.asarray(whole.crop((left, top, left + 224, top + 224))).astype(int)
    assert np.abs(pillow_crop(tmp_path / "photo.png", 256, 224).astype(int) - expected).max() <= 1


def test_readme_snippet_on_real_photos_agrees_with_predict(dogscats_store, tmp_path):
    """Photos decoded by Pillow as the README snippet does: the exported model agrees with `pipeline predict`."""
    valid = shared_dataset("dogscats") / "valid"
    photos = [p for c in ("cats", "dogs") for p in sorted((valid / c).glob("*.jpg"))[:100]]  # bench export: all 999
    run_json("train-head", "--store", dogscats_store[0], "--out", tmp_path / "head")
    run_json("export", tmp_path / "head", "--out", tmp_path / "model.onnx")
    predicted = run_json("predict", tmp_path / "head", *photos)["predictions"]
    expected = {r["path"]: r for r in predicted}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    paths = sorted(expected)
    got = np.concatenate(
        [
            session.run(["probabilities"], {"images": np.stack([pillow_crop(p, 256, 224) for p in paths[i : i + 64]])})[
                0
            ]
            for i in range(0, len(paths), 64)
        ]
    )
    want = np.array([[expected[p]["probabilities"][c] for c in classes] for p in paths])
    assert len(paths) == len(predicted) == 200
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert np.abs(got - want).mean() <= 0.01, np.abs(got - want).mean()
    # The snippet itself, verbatim from the README, on one photo.
    (tmp_path / "snippet.py").write_text(readme_snippet())
    proc = subprocess.run(
        [sys.executable, "snippet.py", paths[0]], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    label, probability = proc.stdout.split()
    assert label == classes[int(got[0].argmax())] and abs(float(probability) - got[0].max()) < 1e-5
