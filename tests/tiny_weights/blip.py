"""a tiny random BLIP captioner with a locally built tokenizer, laid out as Salesforce/blip-image-captioning-*"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

from annotate.blip import HF_FOLDER, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# BERT's special tokens in BERT's order; BLIP adds [DEC] (bos, starts every caption) and [ENC] after the vocab
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "a", "an", "the", "of", "on", "in", "with", "and", "at", "photo", "photography", "picture", "image",
    "man", "woman", "dog", "cat", "bird", "red", "blue", "green", "white", "black", "sitting", "standing",
    "table", "street", "grass", "water", "sky", "tree", "car", "people", "two", "small", "large", "##s",
    "##ing",
]
IMAGE_SIZE = 32  # the published models see 384 px


def write_tokenizer(out: Path) -> BertTokenizer:
    """vocab.txt -> BertTokenizer, plus [DEC] as bos and [ENC], as BLIP's init_tokenizer does."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(out), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tokenizer.save_pretrained(str(out))
    return tokenizer


def tiny_blip_config(tokenizer: BertTokenizer) -> BlipConfig:
    sep = tokenizer.convert_tokens_to_ids("[SEP]")
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
        "sep_token_id": sep,  # generation stops at [SEP]
        "eos_token_id": sep,
        "pad_token_id": tokenizer.convert_tokens_to_ids("[PAD]"),
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "initializer_range": 0.02,  # the default (1e-10) would make every image look the same
    }
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)


def write_tiny_blip(folder: Path, seed: int = 0, name: str = HF_FOLDER) -> Path:
    """`folder`/`name` (blip-image-captioning-large): config, weights, tokenizer, preprocessor_config.json."""
    out = Path(folder) / name
    tokenizer = write_tokenizer(out)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(tiny_blip_config(tokenizer))
    with torch.no_grad():  # a louder cross-attention, so the random captions depend on the image
        for name, param in model.text_decoder.named_parameters():
            if "crossattention" in name and name.endswith(("value.weight", "output.dense.weight")):
                param.mul_(8.0)
    model.save_pretrained(str(out))
    processor = {  # the fields of the published preprocessor_config.json
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "BlipProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out
