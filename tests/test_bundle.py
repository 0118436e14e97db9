"""Model factory and bundle: architectures, local ImageNet weights, verification."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ich_node.imaging import DEFAULT_WINDOWS
from ich_node.labels import LABELS
from ich_node.model.bundle import BundleError, ModelCard, load_bundle, read_card, save_bundle
from ich_node.model.networks import PretrainedWeightsError, build_model
from ich_node.service.cli import main


def _card(**changes: object) -> ModelCard:
    card = ModelCard(name="test", version="1.2.3", arch="resnet18", input_size=64)
    return replace(card, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["resnet18", "resnext101_32x8d"])
def test_architectures_give_six_logits(arch: str) -> None:
    model = build_model(arch).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, len(LABELS))
    assert model.target_layer is model.backbone.layer4[-1]


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("vgg16")


def test_pretrained_weights_from_a_local_torchvision_file(tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", pretrained=path)
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.backbone.fc.out_features == len(LABELS)


def test_missing_or_wrong_pretrained_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="never downloads weights") as info:
        build_model("resnext101_32x8d", pretrained=tmp_path / "absent.pth")
    assert "--pretrained" in str(info.value) and "resnext101_32x8d" in str(info.value)
    import torchvision

    other = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    with pytest.raises(PretrainedWeightsError, match="does not fit resnet18"):
        build_model("resnet18", pretrained=other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(PretrainedWeightsError, match="cannot read"):
        build_model("resnet18", pretrained=junk)


def test_bundle_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model("resnet18").eval()
    thresholds = {label: 0.3 + 0.05 * i for i, label in enumerate(LABELS)}
    card = save_bundle(
        tmp_path / "m.safetensors",
        model,
        _card(thresholds=thresholds, demo=True, metrics={"auc": {"any": 0.9}}),
    )
    assert len(card.sha256) == 64
    bundle = load_bundle(tmp_path / "m.safetensors")
    assert bundle.card == card
    assert bundle.card.windows == DEFAULT_WINDOWS
    assert bundle.card.thresholds == thresholds
    assert "DEMO" in bundle.card.display_name
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(bundle.model(x), model(x))
    assert read_card(tmp_path / "m.safetensors") == card


def _tamper(path: Path) -> None:
    """Flip one byte of the tensor data (after the JSON header)."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len + 1000] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_bundle(path, build_model("resnet18"), _card())
    _tamper(path)
    with pytest.raises(BundleError, match=r"SHA-256 .* does not match"):
        load_bundle(path)


def test_tampered_card_is_refused(tmp_path: Path) -> None:
    """Editing the card's thresholds or architecture cannot pass for the real model."""
    path = tmp_path / "m.safetensors"
    save_bundle(path, build_model("resnet18"), _card())
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    card = json.loads(header["__metadata__"]["ich_node.model_card"])
    card["arch"] = "resnext101_32x8d"
    header["__metadata__"]["ich_node.model_card"] = json.dumps(card)
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    path.write_bytes(struct.pack("<Q", len(new_header)) + new_header + data[8 + header_len :])
    with pytest.raises(BundleError, match="do not fit resnext101_32x8d"):
        load_bundle(path)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such model bundle"):
        load_bundle(tmp_path / "absent.safetensors")
    pickled = tmp_path / "model.pth"
    torch.save(build_model("resnet18").state_dict(), pickled)
    with pytest.raises(BundleError, match="not a safetensors model bundle"):
        load_bundle(pickled)
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    with pytest.raises(BundleError, match="has no ich-node model card"):
        load_bundle(bare)


def test_save_refuses_inconsistent_card(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"card\.arch"):
        save_bundle(tmp_path / "m.safetensors", build_model("resnet18"), _card(arch="resnet50"))


def test_bundle_info_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.safetensors"
    save_bundle(path, build_model("resnet18"), _card())
    assert main(["bundle-info", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["arch"] == "resnet18" and printed["labels"] == list(LABELS)
    _tamper(path)
    assert main(["bundle-info", str(path)]) == 2


def test_torch_free_check_agrees_with_the_model(tmp_path: Path) -> None:
    from ich_node.model.bundle import ARCHITECTURE_NAMES, check_bundle, weights_sha256
    from ich_node.model.networks import ARCHITECTURES

    assert set(ARCHITECTURE_NAMES) == set(ARCHITECTURES)
    model = build_model("resnet18")
    card = save_bundle(tmp_path / "m.safetensors", model, _card(arch="resnet18"))
    # The raw-bytes checksum of check_bundle is the tensors' weights_sha256.
    assert check_bundle(tmp_path / "m.safetensors").sha256 == card.sha256
    assert weights_sha256(model.state_dict()) == card.sha256


def test_checking_a_bundle_imports_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    save_bundle(tmp_path / "m.safetensors", build_model("resnet18"), _card(arch="resnet18"))
    code = (
        "import sys; from ich_node.model.bundle import check_bundle; "
        f"check_bundle({str(tmp_path / 'm.safetensors')!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _without_root_overrides() -> list[str]:
    """A command prefix under which file permissions apply, root or not.

    Root reads any file (CAP_DAC_OVERRIDE); dropping that capability and
    CAP_DAC_READ_SEARCH from the bounding set (util-linux ``setpriv``) makes the
    owner's mode bits count again, as for the unprivileged user a node runs as.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions do not apply")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.mark.parametrize("locked", ["file", "folder"])
def test_a_bundle_the_user_may_not_read_says_permission_not_train(
    tiny_bundle: Path, tmp_path: Path, locked: str
) -> None:
    """EACCES on the file, or on a folder above it: a permission message, no traceback."""
    bundle = tmp_path / "models" / "model.safetensors"
    bundle.parent.mkdir()
    shutil.copyfile(tiny_bundle, bundle)
    config = tmp_path / "node.yaml"
    config.write_text(
        json.dumps(
            {
                "callers": [{"ae_title": "CT1"}],
                "destinations": [
                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112}
                ],
                "model": {"bundle": str(bundle)},
                "storage": {"dir": str(tmp_path / "storage")},
            }
        )
    )
    locked_path = bundle if locked == "file" else bundle.parent
    mode = locked_path.stat().st_mode
    locked_path.chmod(0)
    try:
        for argv in (["bundle-info", str(bundle)], ["check-config", str(config)]):
            run = subprocess.run(
                [*_without_root_overrides(), sys.executable, "-m", "ich_node.cli", *argv],
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            assert run.returncode == 2, run.stderr
            assert f"{bundle}: permission denied" in run.stderr, run.stderr
            assert "let the user the node runs as read the file" in run.stderr
            assert "Traceback" not in run.stderr
            assert "Train one" not in run.stderr and "make demo" not in run.stderr
    finally:
        locked_path.chmod(mode)
    # Readable again: the same file verifies, so the message was about access only.
    assert main(["bundle-info", str(bundle)]) == 0
