"""Lazy encoders and encoder identity (lmms_emi.embed).

* What an encoder is (spec, dimension, cache identity) comes from its config files: building an Embedder
  and asking for ``encoder_spec()`` loads no model; a run whose embeddings are all cached loads no model,
  decodes no image and imports no model library; the vectors are bit-identical cold or warm, lazy or
  eager, in one process or two.
* A local folder holding the paper's CLIP ViT-B/32 or XLM-R-base is recognised from its config and
  recorded under the canonical name, so it passes the paper estimator's check (before any embedding);
  another architecture is still refused.

Paper-architecture folders here hold config files only (no weights): nothing may try to load them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_embed import photos, png_bytes, save_tiny_clip_vision, save_tiny_xlmr
from PIL import Image

from lmms_emi.embed import Embedder, EncoderLoadError, profile_spec
from lmms_emi.embed.encoders import (
    BACKENDS,
    Encoder,
    EncoderBatch,
    EncoderInfo,
    canonical_name,
    load_encoder,
    recognise,
    register_backend,
    register_encoder,
)
from lmms_emi.embed.inputs import make_image_item
from lmms_emi.encoder_spec import PAPER_ENCODERS, spec_differences
from lmms_emi.estimators.club import CLUB, EncoderMismatchError

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["What is in the picture?", "A cat.", "The astronaut smiles.", "", "A cat."]


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_lazy")
    return {"clip": save_tiny_clip_vision(root / "clip"), "xlmr": save_tiny_xlmr(root / "xlmr")}


@pytest.fixture(scope="module")
def image_rows() -> list[dict[str, Any]]:
    """Images as a dataset hands them over (encoded, not decoded), with repeats."""
    encoded = [png_bytes(Image.fromarray(a).resize((48, 48))) for a in photos().values()]
    return [{"bytes": encoded[i % len(encoded)], "path": None} for i in range(10)]


def _tiny(tiny: dict[str, Path], cache: Path | bool = False, **kw: Any) -> Embedder:
    kw.setdefault("progress", False)
    return Embedder(vision=str(tiny["clip"]), text=str(tiny["xlmr"]), cache_dir=cache, **kw)


def _write(folder: Path, name: str, data: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))


def clip_b32_config(**changes: Any) -> dict[str, Any]:
    from transformers import CLIPVisionConfig

    cfg = CLIPVisionConfig(patch_size=32).to_dict()
    cfg.update(changes)
    return cfg


def clip_processor_config(**changes: Any) -> dict[str, Any]:
    from transformers import CLIPImageProcessor

    cfg = json.loads(CLIPImageProcessor().to_json_string())
    cfg.update(changes)
    return cfg


def xlmr_base_config(**changes: Any) -> dict[str, Any]:
    """The hub config of xlm-roberta-base."""
    cfg = {
        "architectures": ["XLMRobertaForMaskedLM"],
        "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 514,
        "model_type": "xlm-roberta",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "output_past": True,
        "pad_token_id": 1,
        "position_embedding_type": "absolute",
        "type_vocab_size": 1,
        "vocab_size": 250002,
    }
    cfg.update(changes)
    return cfg


def config_folder(root: Path, name: str, kind: str, config: dict, extra: dict | None = None) -> Path:
    """A model folder with config files only (no weights)."""
    folder = root / name
    _write(folder, "config.json", config)
    if kind == "clip":
        _write(folder, "preprocessor_config.json", extra if extra is not None else clip_processor_config())
    else:
        tok = (
            extra
            if extra is not None
            else {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512}
        )
        _write(folder, "tokenizer_config.json", tok)
    return folder


@pytest.fixture()
def paper_dirs(tmp_path: Path) -> dict[str, Path]:
    return {
        "clip": config_folder(tmp_path, "my-clip", "clip", clip_b32_config()),
        "xlmr": config_folder(tmp_path, "my-xlmr", "xlmr", xlmr_base_config()),
    }


def _plain_paper_checkpoint(path: Path) -> Path:
    """A CLUB state dict in the paper's plain format (no manifest: taken to be of the paper's encoders)."""
    torch.save(CLUB(768, 768, 500).state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------- laziness
def test_building_and_spec_load_no_model(tiny: dict[str, Path]) -> None:
    e = _tiny(tiny)
    spec = e.encoder_spec()
    assert e.loaded_modalities() == []
    assert spec["vision"] == {"name": str(tiny["clip"]), "feature": "patch_mean", "layer": -1, "dim": 32}
    assert spec["text"]["layer"] == 0 and e.dim == 32
    assert e.encoder_info("vision").recognised is None and e.encoder_info("text").dim == 32
    assert "loaded=[]" in repr(e)
    assert e.stats.load_seconds == 0.0
    # the loaded encoders agree with what their configs said
    assert e.vision.info() == EncoderInfo(**{**vars(e.encoder_info("image")), "source": ""})
    assert e.text.cache_id() == e.encoder_info("text").cache_id
    assert e.loaded_modalities() == ["image", "text"]


def test_warm_run_loads_no_model_and_decodes_no_image(
    tiny: dict[str, Path], image_rows: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cold = _tiny(tiny, cache)
    z_cold = cold.embed_task(image_rows, TEXTS * 2, TEXTS[::-1] * 2, TEXTS * 2)
    assert cold.loaded_modalities() == ["image", "text"]
    assert cold.stats.load_seconds > 0 and 0 < cold.stats.forward_seconds <= cold.stats.image.seconds + 1
    assert cold.stats.image.forward_seconds > 0 and cold.stats.text.forward_seconds > 0

    def no_decoding(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a warm run decoded an image")

    monkeypatch.setattr(Image, "open", no_decoding)
    for key in (("image", "hf-clip"), ("text", "hf-text")):  # loading either encoder would fail
        monkeypatch.setitem(BACKENDS, key, dataclasses.replace(BACKENDS[key], factory=no_decoding))
    warm = _tiny(tiny, cache)
    z_warm = warm.embed_task(image_rows, TEXTS * 2, TEXTS[::-1] * 2, TEXTS * 2)
    assert warm.loaded_modalities() == []
    assert warm.stats.encoder_calls == 0 and warm.stats.load_seconds == 0.0
    for a, b in zip(z_cold, z_warm, strict=True):
        assert torch.equal(a, b)


def test_only_the_missing_modality_is_loaded(
    tiny: dict[str, Path], image_rows: list[dict], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    _tiny(tiny, cache).embed_images(image_rows)
    e = _tiny(tiny, cache)
    e.embed_images(image_rows)
    assert e.loaded_modalities() == []
    e.embed_texts(["a text never seen"])
    assert e.loaded_modalities() == ["text"]


def test_lazy_and_eager_are_bit_identical(tiny: dict[str, Path], image_rows: list[dict]) -> None:
    eager = _tiny(tiny, lazy=False)
    assert eager.loaded_modalities() == ["image", "text"]
    lazy = _tiny(tiny)
    assert lazy.encoder_spec() == eager.encoder_spec()
    assert torch.equal(lazy.embed_images(image_rows), eager.embed_images(image_rows))
    assert torch.equal(lazy.embed_texts(TEXTS), eager.embed_texts(TEXTS))
    assert eager.load() is eager  # already loaded: nothing happens


_CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from helpers_embed import photos, png_bytes
from PIL import Image
from lmms_emi.embed import Embedder
rows = [{{"bytes": png_bytes(Image.fromarray(a).resize((48, 48))), "path": None}} for a in photos().values()]
e = Embedder(vision={clip!r}, text={xlmr!r}, cache_dir={cache!r}, progress=False)
z = {{"img": e.embed_images(rows), "txt": e.embed_texts({texts!r})}}
torch.save(z, {out!r})
print(json.dumps({{"loaded": e.loaded_modalities(), "transformers": "transformers" in sys.modules,
                   "calls": e.stats.encoder_calls}}))
"""


@pytest.mark.slow  # two fresh processes importing torch and transformers
def test_cold_and_warm_processes_bit_identical(tiny: dict[str, Path], tmp_path: Path) -> None:
    """One process or two, cold or warm: the same vectors; the warm process imports no model library."""
    cache = str(tmp_path / "cache")

    def child(out: str) -> dict[str, Any]:
        code = _CHILD.format(
            tests=str(ROOT / "tests"), clip=str(tiny["clip"]), xlmr=str(tiny["xlmr"]), cache=cache,
            texts=TEXTS, out=out,
        )  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    cold = child(str(tmp_path / "cold.pt"))
    warm = child(str(tmp_path / "warm.pt"))
    assert cold["loaded"] == ["image", "text"] and cold["calls"] > 0
    assert warm == {"loaded": [], "transformers": False, "calls": 0}
    a, b = torch.load(tmp_path / "cold.pt"), torch.load(tmp_path / "warm.pt")
    rows = [
        {"bytes": png_bytes(Image.fromarray(x).resize((48, 48))), "path": None} for x in photos().values()
    ]
    here = _tiny(tiny)  # this process, no cache
    for key, z in (("img", here.embed_images(rows)), ("txt", here.embed_texts(TEXTS))):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], z)


def test_importing_the_package_imports_no_model_library() -> None:
    code = (
        "import sys, lmms_emi.embed\n"
        "print([m for m in ('transformers', 'timm', 'open_clip', 'datasets') if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_folder_changed_before_loading_is_an_error(tiny: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    clip = Path(shutil.copytree(tiny["clip"], tmp_path / "clip"))
    e = Embedder(vision=str(clip), text=str(tiny["xlmr"]), cache_dir=False, progress=False)
    cfg = clip / "config.json"
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    with pytest.raises(EncoderLoadError, match="did its files change"):
        e.embed_images([Image.new("RGB", (40, 40))])


def test_text_layer_checked_from_config_alone(paper_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Embedder(vision=str(paper_dirs["clip"]), text=str(paper_dirs["xlmr"]), text_layer=13, cache_dir=False)
    e = Embedder(vision=str(paper_dirs["clip"]), text=str(paper_dirs["xlmr"]), text_layer=-1, cache_dir=False)
    assert e.encoder_spec()["text"]["layer"] == 12


def test_missing_config_is_a_load_error(tmp_path: Path, paper_dirs: dict[str, Path]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderLoadError, match=r"could not load CLIP vision model '.*empty': .*config\.json"):
        Embedder(vision=str(tmp_path / "empty"), text=str(paper_dirs["xlmr"]), cache_dir=False)


class _Constant(Encoder):
    modality = "image"
    backend = "constant"

    def __init__(self, source: str, *, name: str | None = None) -> None:
        self.name, self.feature, self.layer, self.dim = name or "constant", "ones", -1, 32
        self.fingerprint = source or "v1"

    def prepare(self, items: Any) -> EncoderBatch:
        return EncoderBatch({"x": torch.ones(len(items), 32)})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs["x"]

    def to(self, device: torch.device) -> _Constant:
        return self


def test_registered_backend_with_and_without_describer(tiny: dict[str, Path]) -> None:
    try:
        register_encoder("image", "constant", _Constant)
        e = Embedder(vision="constant:v1", text=str(tiny["xlmr"]), cache_dir=False, progress=False)
        assert e.loaded_modalities() == ["image"]  # no describer: loaded to learn what it is
        # the decorator form replaces the registration, now with a describer
        register_backend("constant", describe=lambda s, name=None: _Constant(s).info())(_Constant)
        e = Embedder(vision="constant:v1", text=str(tiny["xlmr"]), cache_dir=False, progress=False)
        assert e.loaded_modalities() == []
        assert e.encoder_spec()["vision"] == {"name": "constant", "feature": "ones", "layer": -1, "dim": 32}
        z = e.embed_images([Image.new("RGB", (8, 8))])
        assert e.loaded_modalities() == ["image"] and z.shape == (1, 32)
    finally:
        BACKENDS.pop(("image", "constant"), None)


def test_image_hash_memo_compares_contents() -> None:
    a = png_bytes(Image.new("RGB", (16, 16), (255, 0, 0)))
    b = bytearray(a)
    b[len(b) // 2] ^= 1  # same length, first and last bytes: only the full comparison tells them apart
    memo: dict = {}
    items = [make_image_item(x, i, None, memo) for i, x in enumerate([a, bytes(bytearray(a)), bytes(b), a])]
    ha, hb = make_image_item(a, 0).content_hash, make_image_item(bytes(b), 0).content_hash
    assert ha != hb
    assert [it.content_hash for it in items] == [ha, ha, hb, ha]


# ---------------------------------------------------------------------------------------- identity
def test_local_copies_of_the_paper_encoders_take_the_paper_names(
    paper_dirs: dict[str, Path], tmp_path: Path
) -> None:
    e = Embedder(
        vision=str(paper_dirs["clip"]), text=str(paper_dirs["xlmr"]), cache_dir=False, progress=False
    )
    spec = e.encoder_spec()
    assert spec == json.loads(json.dumps(PAPER_ENCODERS))
    assert spec_differences(PAPER_ENCODERS, spec) == []
    assert e.encoder_info("vision").recognised == "openai/clip-vit-base-patch32"
    assert e.encoder_info("text").recognised == "xlm-roberta-base"
    # the paper's estimator (plain state dict) accepts them; nothing was loaded (there are no weights)
    CLUB.from_checkpoint(_plain_paper_checkpoint(tmp_path / "club.pt"), encoders=spec)
    assert e.loaded_modalities() == []
    # the cache still tells two folders apart (their files differ), whatever their recorded name
    other = config_folder(tmp_path, "other-clip", "clip", clip_b32_config(initializer_range=0.03))
    e2 = Embedder(vision=str(other), text=str(paper_dirs["xlmr"]), cache_dir=False)
    assert e2.encoder_spec() == spec
    assert e2.encoder_info("vision").cache_id != e.encoder_info("vision").cache_id
    # the same through profile_spec, what a command can check before building anything
    assert (
        profile_spec("paper", vision=str(paper_dirs["clip"]), text=str(paper_dirs["xlmr"]), batch_size=8)
        == spec
    )


def test_with_the_reference_checkpoint(paper_dirs: dict[str, Path]) -> None:
    ref = (
        Path(os.environ.get("LMMS_EMI_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))
        / "CLUB_global.pt"
    )
    if not ref.is_file():
        pytest.skip(f"{ref} not present")
    spec = profile_spec("paper", vision=str(paper_dirs["clip"]), text=str(paper_dirs["xlmr"]))
    club = CLUB.from_checkpoint(ref, encoders=spec)
    assert club.manifest_ is None


def test_other_architecture_is_refused_before_any_embedding(
    paper_dirs: dict[str, Path], tmp_path: Path
) -> None:
    b16 = config_folder(tmp_path, "clip-b16", "clip", clip_b32_config(patch_size=16))
    e = Embedder(vision=str(b16), text=str(paper_dirs["xlmr"]), cache_dir=False)
    assert e.encoder_spec()["vision"]["name"] == str(b16)
    with pytest.raises(EncoderMismatchError, match=r"vision\.name"):
        CLUB.from_checkpoint(_plain_paper_checkpoint(tmp_path / "club.pt"), encoders=e.encoder_spec())
    assert e.loaded_modalities() == []


@pytest.mark.parametrize(
    ("config", "processor", "expected"),
    [
        ({}, {}, "openai/clip-vit-base-patch32"),
        ({"_name_or_path": "openai/clip-vit-base-patch32"}, {}, "openai/clip-vit-base-patch32"),
        ({"_name_or_path": "/home/me/models/clip"}, {}, "openai/clip-vit-base-patch32"),
        ({"_name_or_path": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"}, {}, None),  # another model
        ({"patch_size": 16}, {}, None),
        ({"hidden_act": "gelu"}, {}, None),
        ({"num_hidden_layers": 24}, {}, None),
        ({}, {"image_mean": [0.5, 0.5, 0.5]}, None),
        ({}, {"crop_size": 224, "size": 224}, "openai/clip-vit-base-patch32"),  # the hub's old spelling
        ({}, {"crop_size": 336}, None),
    ],
)
def test_clip_recognition(config: dict, processor: dict, expected: str | None) -> None:
    assert recognise("hf-clip", clip_b32_config(**config), clip_processor_config(**processor)) == expected


def test_clip_recognised_inside_a_full_clip_config() -> None:
    from transformers import CLIPConfig

    full = CLIPConfig().to_dict()
    assert full["model_type"] == "clip"
    assert recognise("hf-clip", full, clip_processor_config()) == "openai/clip-vit-base-patch32"
    full["vision_config"]["patch_size"] = 14
    assert recognise("hf-clip", full, clip_processor_config()) is None
    assert recognise("hf-text", clip_b32_config(), None) is None  # wrong backend


@pytest.mark.parametrize(
    ("changes", "tokenizer", "expected"),
    [
        ({}, {"tokenizer_class": "XLMRobertaTokenizer"}, "xlm-roberta-base"),
        ({}, {}, "xlm-roberta-base"),
        ({"_name_or_path": "FacebookAI/xlm-roberta-base"}, {}, "xlm-roberta-base"),
        ({"_name_or_path": "xlm-roberta-large"}, {}, None),
        ({"layer_norm_eps": 1e-12}, {}, None),  # transformers' default, not the model's
        ({"num_hidden_layers": 24, "hidden_size": 1024}, {}, None),
        ({"vocab_size": None}, {}, None),  # missing: the library default (30522) applies
        ({}, {"tokenizer_class": "BertTokenizer"}, None),
        ({"model_type": "roberta"}, {}, None),
    ],
)
def test_xlmr_recognition(changes: dict, tokenizer: dict, expected: str | None) -> None:
    cfg = xlmr_base_config(**changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    assert recognise("hf-text", cfg, tokenizer=tokenizer) == expected


def test_explicit_names_win_and_aliases_are_canonical(paper_dirs: dict[str, Path], tmp_path: Path) -> None:
    assert canonical_name("FacebookAI/xlm-roberta-base") == "xlm-roberta-base"
    assert canonical_name("someone/else") == "someone/else"
    e = Embedder(
        vision=str(paper_dirs["clip"]), text=str(paper_dirs["xlmr"]), text_name="my-xlmr", cache_dir=False
    )
    assert e.encoder_spec()["text"]["name"] == "my-xlmr"
    e = Embedder(
        vision=str(paper_dirs["clip"]),
        text=str(paper_dirs["xlmr"]),
        text_name="FacebookAI/xlm-roberta-base",
        cache_dir=False,
    )
    assert e.encoder_spec()["text"]["name"] == "xlm-roberta-base"
    lost = config_folder(tmp_path, "not-xlmr", "xlmr", xlmr_base_config(layer_norm_eps=1e-12))
    e = Embedder(vision=str(paper_dirs["clip"]), text=str(lost), cache_dir=False)
    assert e.encoder_spec()["text"]["name"] == str(lost) and e.encoder_info("text").recognised is None


def test_tiny_models_keep_their_path_and_load_with_the_same_identity(tiny: dict[str, Path]) -> None:
    """Folders that are not a known encoder are named by their path, loaded or not."""
    e = _tiny(tiny)
    assert e.encoder_spec()["text"]["name"] == str(tiny["xlmr"])
    assert load_encoder(str(tiny["xlmr"]), "text").name == str(tiny["xlmr"])


@pytest.fixture()
def tiny_weights_everywhere(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers loads the tiny models whatever folder or hub id it is asked for (the paper-architecture
    folders here hold config files only, and the hub is out of reach)."""
    from transformers import AutoModel, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

    for cls, kind in (
        (CLIPVisionModel, "clip"), (CLIPImageProcessor, "clip"), (AutoModel, "xlmr"), (AutoTokenizer, "xlmr"),
    ):  # fmt: skip
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained", lambda *_a, _real=real, _p=tiny[kind], **_k: _real(_p))


def test_loaded_encoders_take_the_same_name(
    paper_dirs: dict[str, Path], tiny_weights_everywhere: None
) -> None:
    """Loading names an encoder by the rule describing uses: an eager Embedder (which loads without
    describing first) records the names a lazy one reads from the configs."""
    clip, xlmr = str(paper_dirs["clip"]), str(paper_dirs["xlmr"])
    eager = Embedder(vision=clip, text=xlmr, cache_dir=False, progress=False, lazy=False)
    assert eager.loaded_modalities() == ["image", "text"]
    lazy = Embedder(vision=clip, text=xlmr, cache_dir=False, progress=False)
    names = {m: eager.encoder_spec()[m]["name"] for m in ("vision", "text")}
    assert names == {m: lazy.encoder_spec()[m]["name"] for m in ("vision", "text")}
    assert names == {"vision": "openai/clip-vit-base-patch32", "text": "xlm-roberta-base"}
    mine = Embedder(vision=clip, text=xlmr, vision_name="mine", cache_dir=False, progress=False, lazy=False)
    assert mine.encoder_spec()["vision"]["name"] == "mine"
    assert load_encoder("hf-text:FacebookAI/xlm-roberta-base", "text").name == "xlm-roberta-base"
