"""A GGUF of the tiny model, written with the ``gguf`` package's writer (for ``cotune models add
--gguf``): llama.cpp's tensor names, its q/k row order (``convert_hf_to_gguf.py`` permutes them;
transformers undoes it on load), float32 tensors and the byte-level BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
}


def write_llama_gguf(model_dir: Path, out: Path, *, chat_template: bool = True) -> Path:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])

    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    added = {t["id"]: t["content"] for t in tokenizer["added_tokens"]}
    by_id.update(added)
    ids = range(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([by_id[i] for i in ids])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL for i in ids]
    )
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    if chat_template:
        writer.add_chat_template((model_dir / "chat_template.jinja").read_text())

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return (
            w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        if name in TOP_TENSORS:
            gguf_name = TOP_TENSORS[name]
        else:
            _, _, layer, *module, _ = name.split(".")
            kind = ".".join(module)
            gguf_name = f"blk.{layer}.{LAYER_TENSORS[kind]}.weight"
            if kind == "self_attn.q_proj":
                tensor = permute(tensor, config["num_attention_heads"])
            elif kind == "self_attn.k_proj":
                tensor = permute(tensor, config["num_key_value_heads"])
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_hub_cache(model_dir: Path, cache: Path, repo: str, commit: str) -> Path:
    """``model_dir`` as huggingface_hub's cache holds a downloaded repository: blobs, a
    ``snapshots/<commit>/`` of symlinks to them and ``refs/main``."""
    import hashlib

    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(model_dir.iterdir()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return root
