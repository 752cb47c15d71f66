"""E5-V encoder profiles ("e5v-disjoint", "e5v-joint") on a tiny random-weight LLaVA-NeXT saved on the spot
(``tests/tiny_llava.py``): every vector against a direct forward pass of transformers' LLaVA-NeXT class with
the prompt written out here in full, one input at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_llava import save_tiny_llava  # tests/ is on sys.path (pytest rootdir)

from lmms_emi.embed import Embedder, EncoderLoadError, profile_spec
from lmms_emi.embed.encoders import E5VText
from lmms_emi.embed.encoders.e5v import JOINT_PROMPTS
from lmms_emi.pipeline.records import Sample, embed_tasks

HEAD = "<|start_header_id|>user<|end_header_id|>\n\n"
TAIL = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
TEXTS = ["a cat", "What colour is the car in the photo?", "Wie viele Personen sind dort?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("e5v") / "llava_next", "llava_next")


@pytest.fixture(scope="module")
def direct(tiny: Path):
    """The oracle: the saved model and processor, used one prompt at a time (no padding)."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny).eval()
    proc = LlavaNextProcessor.from_pretrained(tiny)

    def last_state(prompt: str, image: Image.Image | None = None) -> torch.Tensor:
        pics = None if image is None else [image]
        enc = proc(text=[HEAD + prompt + TAIL], images=pics, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-1][0, -1]

    return last_state


def unit(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm()


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 30), (64, 48)]  # different LLaVA-NeXT tilings: different sequence lengths
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def embedder(tiny: Path, joint: bool, **kwargs) -> Embedder:
    vision = f"e5v-joint:{tiny}" if joint else f"e5v:{tiny}"
    return Embedder(vision=vision, text=f"e5v:{tiny}", text_layer=-1, progress=False, num_workers=0, **kwargs)


def test_disjoint_vectors_are_the_last_token_under_e5v_prompts(tiny: Path, direct) -> None:
    emb = embedder(tiny, joint=False, cache_dir=False, batch_size=3)
    z_t = emb.embed_texts(TEXTS)  # one padded batch of three lengths
    want_t = torch.stack([unit(direct(f"{t}\nSummary above sentence in one word: ")) for t in TEXTS])
    torch.testing.assert_close(z_t, want_t, atol=2e-5, rtol=0)
    z_v = emb.embed_images(images())
    want_v = torch.stack([unit(direct("<image>\nSummary above image in one word: ", im)) for im in images()])
    torch.testing.assert_close(z_v, want_v, atol=2e-5, rtol=0)
    assert z_t.shape == z_v.shape == (3, 48)
    assert emb.vision.model is emb.text.model  # one loaded model for both encoders


def test_joint_vector_is_the_mean_of_the_four_prompts(tiny: Path, direct) -> None:
    emb = embedder(tiny, joint=True, cache_dir=False, batch_size=2)
    assert emb.joint_query and len(JOINT_PROMPTS) == 4
    z = emb.embed_queries(images(), TEXTS)
    for i, (im, q) in enumerate(zip(images(), TEXTS, strict=True)):
        states = [unit(direct(p.replace("<sent>", q), im)) for p in JOINT_PROMPTS]
        torch.testing.assert_close(z[i], unit(torch.stack(states).mean(dim=0)), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="embed_queries"):
        emb.embed_images(images())


def test_joint_task_records_the_query_as_both_z_v_and_z_t(tiny: Path, tmp_path: Path) -> None:
    emb = embedder(tiny, joint=True, cache_dir=tmp_path)
    responses, references = ["a grey cat", "red", "zwei"], ["a cat on a mat", "red", "two people"]
    task = emb.embed_task(images(), TEXTS, responses, references)
    torch.testing.assert_close(task.z_v, task.z_t, atol=0, rtol=0)
    torch.testing.assert_close(task.z_model, emb.embed_texts(responses), atol=0, rtol=0)
    rows = zip(images(), TEXTS, responses, references, strict=True)
    samples = [Sample("t", i, im, q, r, y) for i, (im, q, r, y) in enumerate(rows)]
    fresh = embedder(tiny, joint=True, cache_dir=tmp_path)
    run = embed_tasks(fresh, {"t": samples})["t"]  # the run pipeline's embedding step
    for a, b in zip(run, task, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # questions are embedded with their images only, never as texts; "red" twice is embedded once
    assert (fresh.stats.text.requested, fresh.stats.text.unique, fresh.stats.image.requested) == (6, 5, 3)
    # the cache serves a second Embedder without loading any model
    again = embedder(tiny, joint=True, cache_dir=tmp_path)
    torch.testing.assert_close(again.embed_task(images(), TEXTS, responses, references).z_v, task.z_v)
    assert again.loaded_modalities() == []


def test_encoder_identity_is_recorded_without_loading(tiny: Path) -> None:
    emb = embedder(tiny, joint=True, cache_dir=False)
    spec = emb.encoder_spec()
    assert emb.loaded_modalities() == []
    assert spec == {
        "vision": {"name": str(tiny), "feature": "e5v_joint", "layer": 2, "dim": 48},
        "text": {"name": str(tiny), "feature": "e5v_text", "layer": 2, "dim": 48},
    }
    assert profile_spec("e5v-joint", vision=f"e5v-joint:{tiny}", text=f"e5v:{tiny}") == spec
    disjoint = profile_spec("e5v-disjoint", vision=f"e5v:{tiny}", text=f"e5v:{tiny}", vision_name="my/e5v")
    assert disjoint["vision"] == {"name": "my/e5v", "feature": "e5v_image", "layer": 2, "dim": 48}
    assert (
        emb.encoder_info("vision").cache_id
        != embedder(tiny, False, cache_dir=False).encoder_info("vision").cache_id
    )  # joint and image vectors never share cache entries
    # the real model's identity, fixed (royokong/e5-v: Llama-3-8B, 32 layers, 4096 wide)
    assert profile_spec("e5v-disjoint") == {
        "vision": {"name": "royokong/e5-v", "feature": "e5v_image", "layer": 32, "dim": 4096},
        "text": {"name": "royokong/e5-v", "feature": "e5v_text", "layer": 32, "dim": 4096},
    }
    assert profile_spec("e5v-joint")["vision"]["feature"] == "e5v_joint"
    # what the loaded encoders say agrees with what the config said
    emb.load()
    assert emb.vision.info().cache_id == emb.encoder_info("vision").cache_id
    assert emb.text.info().cache_id == emb.encoder_info("text").cache_id


def test_long_text_is_cut_before_the_prompt_end(tiny: Path) -> None:
    enc = E5VText(str(tiny), max_text_tokens=5)
    batch = enc.prepare(["short", "a much longer text that has many more than five tokens in it"])
    assert batch.truncated == [1]
    tail = "\nSummary above sentence in one word: " + TAIL
    tail_ids = enc.processor.tokenizer(tail, add_special_tokens=False)
    n = int(batch.inputs["attention_mask"][1].sum())
    row = batch.inputs["input_ids"][1, :n].tolist()
    assert row[-len(tail_ids["input_ids"]) :] == tail_ids["input_ids"]  # the embedding token is still last


def test_not_a_llava_next_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(EncoderLoadError, match=r"not a LLaVA-NeXT") as info:
        Embedder(vision=f"e5v:{tmp_path}", text=f"e5v:{tmp_path}", cache_dir=False)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_joint_profile_through_lmms_emi_score(tiny: Path, tmp_path: Path, demo_natural) -> None:
    """The joint E5-V encoders through the whole run pipeline (``lmms-emi score``): the saved embeddings hold
    z_v = z_t and record the E5-V identity; the report is written."""
    from lmms_emi.cli import main
    from lmms_emi.embed.store import load_embeddings

    out = tmp_path / "out"
    args = ["score", "--dataset", str(demo_natural["data"]), "--responses", str(demo_natural["responses"]),
            "--benchmark", "natural", "--output-path", str(out), "--encoders", "offline",
            "--vision-encoder", f"e5v-joint:{tiny}", "--text-encoder", f"e5v:{tiny}", "--bootstrap", "0",
            "--estimator-steps", "20", "--emi-cache", "off", "-q"]  # fmt: skip
    assert main(args) == 0
    (emb_file,) = out.glob("*embeddings*.safetensors")
    tasks, spec = load_embeddings(emb_file)
    assert spec["vision"] == {"name": str(tiny), "feature": "e5v_joint", "layer": 2, "dim": 48}
    assert spec["text"]["feature"] == "e5v_text" and "projection" not in spec
    assert len(tasks) == 5
    for emb in tasks.values():
        torch.testing.assert_close(emb.z_v, emb.z_t, atol=0, rtol=0)
        assert emb.z_model is not None and emb.z_model.shape == emb.z_v.shape
    report = json.loads(next(out.glob("*_emi_report_natural.json")).read_text())
    assert json.dumps(report).count("e5v_joint") >= 1


def test_a_processor_saved_without_patch_size_gives_the_same_vectors(tiny: Path, tmp_path: Path) -> None:
    """royokong/e5-v's processor config predates ``patch_size`` (and the select strategy): it is taken from
    the model's vision config, and the vectors are those of a complete save."""
    import shutil

    old = tmp_path / "old_save"
    shutil.copytree(tiny, old)
    cfg = json.loads((old / "processor_config.json").read_text())
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
        cfg.pop(key)
    (old / "processor_config.json").write_text(json.dumps(cfg))
    z_old = embedder(old, joint=False, cache_dir=False).embed_images(images())
    z_new = embedder(tiny, joint=False, cache_dir=False).embed_images(images())
    torch.testing.assert_close(z_old, z_new, atol=0, rtol=0)
