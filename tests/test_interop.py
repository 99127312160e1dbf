"""Interoperability: HF ``transformers`` folders out, official BLIP checkpoints in, pickles refused."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers  # a locked dependency: missing, it is an error, not a skip
from torch.testing import assert_close

from blip_core.checkpoint import load_model, read_config, save_checkpoint
from blip_core.config import DEC_TOKEN_ID, ENC_TOKEN_ID, PAD_TOKEN_ID, SEP_TOKEN_ID, model_preset
from blip_core.generate import generate_token_ids, inference, prompt_token_ids
from blip_core.interop import (
    export_hf,
    export_main,
    import_blip,
    import_main,
    read_state_dict,
    to_official,
)
from blip_core.losses import lm_labels
from blip_core.model import BlipModel

CAPTIONS = ["a red circle above a blue square", "a green triangle", "two small squares on the left"]


@pytest.fixture(scope="module")
def tokenizer():
    from blip_core.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model() -> BlipModel:
    """A tiny seeded model whose decoder depends strongly on the image (so captions differ)."""
    torch.manual_seed(0)
    m = BlipModel(model_preset("tiny")).eval()
    with torch.no_grad():
        for layer in m.text_encoder.layers:
            layer.cross_attn.value.weight.mul_(30.0)
            layer.cross_attn.dense.weight.mul_(30.0)
        m.lm_head.bias.normal_(0.0, 0.5)
    m.sync_momentum()
    return m


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ours") / "ck", model, tokenizer, {})


@pytest.fixture(scope="module")
def inputs(tokenizer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    lm = tokenizer(["a picture of " + c for c in CAPTIONS], padding="longest", return_tensors="pt")
    return {"images": torch.randn(len(CAPTIONS), 3, 64, 64, generator=g),
            "text_ids": text.input_ids, "text_mask": text.attention_mask,
            "lm_ids": lm.input_ids, "lm_mask": lm.attention_mask}


def _load_hf(cls, folder: Path):
    hf, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys, no errors
    return hf.eval()


@pytest.fixture(scope="module")
def hf_captioner(checkpoint, tmp_path_factory):
    out = export_hf(checkpoint, tmp_path_factory.mktemp("hf") / "captioner", "captioner")
    return _load_hf(transformers.BlipForConditionalGeneration, out), out


@pytest.fixture(scope="module")
def hf_retrieval(checkpoint, tmp_path_factory):
    out = export_hf(checkpoint, tmp_path_factory.mktemp("hf") / "retrieval", "retrieval")
    return _load_hf(transformers.BlipForImageTextRetrieval, out), out


# --- export to Hugging Face ----------------------------------------------------------------


def test_exported_config_matches_ours(hf_captioner, model):
    cfg = hf_captioner[0].config
    text, vision = cfg.text_config, cfg.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (128, 4, 4)
    assert (vision.image_size, vision.patch_size, vision.intermediate_size) == (64, 16, 512)
    assert vision.layer_norm_eps == 1e-6 and text.layer_norm_eps == 1e-12
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (128, 3, 4)
    assert (text.vocab_size, text.max_position_embeddings, text.encoder_hidden_size) == (30524, 64, 128)
    assert (text.bos_token_id, text.sep_token_id, text.eos_token_id, text.pad_token_id) == (
        DEC_TOKEN_ID, SEP_TOKEN_ID, SEP_TOKEN_ID, PAD_TOKEN_ID)
    head = hf_captioner[0].text_decoder
    assert head.cls.predictions.decoder.weight is head.bert.embeddings.word_embeddings.weight


def test_retrieval_export_gives_our_itm_logits_and_itc_similarities(hf_retrieval, model, inputs):
    hf, _ = hf_retrieval
    images, ids, mask = inputs["images"], inputs["text_ids"], inputs["text_mask"]
    with torch.no_grad():
        image_embeds = model.encode_image(images)
        assert_close(hf.vision_model(pixel_values=images).last_hidden_state, image_embeds,
                     atol=1e-5, rtol=1e-4)
        # HF does not swap [CLS] for [ENC] itself: the caller gives the ITM input its [ENC].
        enc_ids = ids.clone()
        enc_ids[:, 0] = ENC_TOKEN_ID
        itm = hf(input_ids=enc_ids, pixel_values=images, attention_mask=mask, use_itm_head=True)
        assert_close(itm.itm_score, model.itm_logits(image_embeds, ids, mask), atol=1e-4, rtol=1e-4)
        itc = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=False)
        sim = model.image_features(image_embeds) @ model.text_features(ids, mask).t()
        assert_close(itc.itm_score, sim, atol=1e-5, rtol=1e-4)


def test_captioner_export_gives_our_lm_logits_and_loss(hf_captioner, model, inputs):
    hf, _ = hf_captioner
    images, ids, mask = inputs["images"], inputs["lm_ids"], inputs["lm_mask"]
    dec_ids = ids.clone()
    dec_ids[:, 0] = DEC_TOKEN_ID  # HF's forward uses input_ids as given
    labels = lm_labels(ids, PAD_TOKEN_ID, prompt_length=4)
    with torch.no_grad():
        ours = model.lm_logits(model.encode_image(images), ids, mask)
        out = hf(pixel_values=images, input_ids=dec_ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert_close(out.logits[real], ours[real], atol=1e-4, rtol=1e-4)
    assert_close(out.loss, model.lm_loss(ours, labels), atol=1e-5, rtol=1e-5)  # smoothing 0.1


def test_captioner_export_gives_our_greedy_captions(hf_captioner, model, tokenizer, inputs):
    hf, _ = hf_captioner
    images = inputs["images"]
    prompt_ids = prompt_token_ids(tokenizer, model.cfg.prompt)  # [DEC] a picture of
    with inference(model):
        ours = generate_token_ids(model, model.encode_image(images), prompt_ids, method="greedy",
                                  max_length=12, min_length=3, lengths="new_tokens").tokens
    # HF's generate swaps the first token for bos ([DEC]) and drops the last one ([SEP]).
    prompt = tokenizer([model.cfg.prompt] * len(images), return_tensors="pt").input_ids
    with torch.no_grad():
        hf_ids = hf.generate(pixel_values=images, input_ids=prompt, num_beams=1, do_sample=False,
                             max_new_tokens=12, min_new_tokens=3)
    assert (hf_ids[:, :4] == torch.tensor([DEC_TOKEN_ID, *prompt[0, 1:4].tolist()])).all()
    theirs = [[t for t in row[4:].tolist() if t != PAD_TOKEN_ID] for row in hf_ids]
    assert [caps[0] for caps in ours] == theirs
    assert len({tuple(t) for t in theirs}) > 1  # the captions depend on the image


def test_processor_resizes_and_normalises_as_we_do(hf_retrieval):
    from PIL import Image

    from blip_core.data.dataset import image_transform

    _, folder = hf_retrieval
    processor = transformers.BlipProcessor.from_pretrained(str(folder), local_files_only=True)
    pixels = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.to(torch.uint8).numpy())
    theirs = processor(images=image, text="a red circle", return_tensors="pt")
    assert_close(theirs.pixel_values[0], image_transform(64)(image), atol=1e-5, rtol=1e-5)
    assert theirs.input_ids[0, 0] == 101 and theirs.input_ids[0, -1] == SEP_TOKEN_ID


# --- import of official checkpoints --------------------------------------------------------


def _outputs(m: BlipModel, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        emb = m.encode_image(inputs["images"])
        return [m.itm_logits(emb, inputs["text_ids"], inputs["text_mask"]),
                m.text_features(inputs["text_ids"], inputs["text_mask"]),
                m.image_features(emb),
                m.lm_logits(emb, inputs["lm_ids"], inputs["lm_mask"])]


def test_official_layout_imports_to_the_same_model(model, inputs, tmp_path):
    official = to_official(model)
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight" in official
    assert "text_decoder.cls.predictions.decoder.weight" in official
    official["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # BLIP's buffer
    official["text_encoder.pooler.dense.weight"] = torch.zeros(128, 128)  # ignored
    pth = tmp_path / "model_base.pth"
    torch.save({"model": official, "epoch": 3}, pth)

    # Heads cannot be read from weights: the tiny preset has 32-wide heads, not 64.
    assert import_main([str(pth), str(tmp_path / "ck"), "--vision-heads", "4", "--text-heads", "4"]) == 0
    imported = load_model(tmp_path / "ck").eval()
    cfg, meta = read_config(tmp_path / "ck")
    assert cfg.vision == model.cfg.vision
    assert cfg.text == replace(model.cfg.text, dropout=0.1)  # not in the weights: BERT's default
    assert cfg.embed_dim == model.cfg.embed_dim and cfg.queue_size == model.cfg.queue_size
    assert meta["initialised"] == []
    for ours, theirs in zip(_outputs(model, inputs), _outputs(imported, inputs), strict=True):
        assert_close(theirs, ours, atol=0, rtol=0)
    state = imported.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_import_of_a_captioner_only_checkpoint_keeps_its_decoder(model, inputs, tmp_path):
    official = {k: v for k, v in to_official(model).items()
                if k.startswith(("visual_encoder.", "text_decoder."))}
    torch.save(official, tmp_path / "caption.pth")  # a bare state dict
    import_blip(tmp_path / "caption.pth", tmp_path / "ck", vision_heads=4, text_heads=4)
    imported = load_model(tmp_path / "ck").eval()
    with torch.no_grad():
        emb = imported.encode_image(inputs["images"])
        lm = imported.lm_logits(emb, inputs["lm_ids"], inputs["lm_mask"])
    assert_close(lm, _outputs(model, inputs)[3], atol=0, rtol=0)
    initialised = read_config(tmp_path / "ck")[1]["initialised"]
    assert "text_encoder.layers.*.self_attn.query" in initialised and "itm_head" in initialised
    assert not any(n.startswith(("visual_encoder", "lm_head")) for n in initialised)


def test_import_refuses_an_untied_decoder(model, tmp_path):
    official = to_official(model)
    official["text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"] += 1e-3
    torch.save({"model": official}, tmp_path / "untied.pth")
    with pytest.raises(ValueError, match="tied"):
        import_blip(tmp_path / "untied.pth", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


class _Exploit:
    """Unpickling this object would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_malicious_pickle_is_refused_and_never_run(model, tmp_path, legacy):
    marker = tmp_path / "pwned"
    pth = tmp_path / "evil.pth"
    payload = {"model": {**to_official(model), "trap": _Exploit(marker)}}
    torch.save(payload, pth, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError, match="refusing"):
        import_blip(pth, tmp_path / "ck")
    assert not marker.exists()
    assert not (tmp_path / "ck").exists()


def test_anything_but_a_tensor_dict_is_refused(tmp_path):
    torch.save({"model": {"visual_encoder.cls_token": [1.0, 2.0]}}, tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not name -> tensor"):
        read_state_dict(tmp_path / "list.pth")
    torch.save([torch.zeros(1)], tmp_path / "seq.pth")
    with pytest.raises(ValueError, match="dict of tensors"):
        read_state_dict(tmp_path / "seq.pth")


def test_export_cli(checkpoint, tmp_path, capsys):
    assert export_main([str(checkpoint), str(tmp_path / "hf"), "--task", "retrieval"]) == 0
    assert str((tmp_path / "hf").resolve()) in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--help"])
    assert exit_info.value.code == 0
