"""Write a Llama- or Qwen3-architecture model and its byte-level BPE tokenizer as a GGUF
file, the way llama.cpp's ``convert_hf_to_gguf.py`` does for ``LlamaForCausalLM`` and
``Qwen3ForCausalLM``, with the ``gguf`` package: llama.cpp's tensor names and
hyperparameter keys, the Q/K row permutation (Llama only: llama.cpp rotates Qwen3's
heads in NEOX order, as transformers does), Qwen3's per-head q/k norms as
``blk.N.attn_q_norm`` / ``attn_k_norm``, norms kept in f32, and the tokenizer as
``tokenizer.ggml.model = gpt2`` with its chat template. llama.cpp runs the file;
transformers' GGUF loader reads it back.
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from pathlib import Path

import gguf
import torch

from gym_core.base.errors import GymError

#: Hugging Face architecture -> (its model_type, llama.cpp's architecture)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", gguf.MODEL_ARCH.LLAMA),
    "Qwen3ForCausalLM": ("qwen3", gguf.MODEL_ARCH.QWEN3),
}

# outtype -> (file type recorded in general.file_type, tensor type of the 2-D weights).
# Norms and other 1-D tensors stay f32, as llama.cpp's converter keeps them.
OUTTYPES = {
    "f32": ("ALL_F32", "F32"),
    "f16": ("MOSTLY_F16", "F16"),
    "bf16": ("MOSTLY_BF16", "BF16"),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"),
}

# llama.cpp tells BPE pre-tokenizers apart by the ids a tokenizer gives this text (its
# convert_hf_to_gguf.py, get_vocab_base_pre): the hash names the text splitting rule
# (tokenizer.ggml.pre) it must apply before the merges.
_PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Hashes as llama.cpp's converter lists them, for the byte-level BPE tokenizers found in
# Llama- and Qwen3-architecture models (SmolLM / SmolLM2, Llama 3, GPT-2's, Qwen's).
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5..2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
}


def check_supported(model) -> None:
    """One-line errors for models this writer cannot represent exactly."""
    arch = _architecture(model)
    if arch not in ARCHITECTURES or model.config.model_type != ARCHITECTURES[arch][0]:
        raise GymError(
            f"format=gguf writes {', '.join(ARCHITECTURES)} models; this run's model is "
            f"{arch}. Export it with format=hf (or format=lora) instead"
        )
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = []
    if rope_type != "default":
        unsupported.append(f"rope scaling {rope_type!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        unsupported.append("attention/MLP biases")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        unsupported.append(f"activation {cfg.hidden_act!r}")
    if getattr(cfg, "use_sliding_window", False):
        unsupported.append("sliding-window attention")
    if unsupported:
        raise GymError(
            f"format=gguf writes plain {arch} models; this one has {', '.join(unsupported)}, "
            "which the export does not write. Export it with format=hf instead"
        )


def _architecture(model) -> str:
    return (getattr(model.config, "architectures", None) or [type(model).__name__])[0]


def _bpe_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or \
            (data.get("decoder") or {}).get("type") != "ByteLevel":
        kind = model.get("type", type(tokenizer).__name__)
        raise GymError(
            f"format=gguf writes byte-level BPE tokenizers (tokenizer.ggml.model=gpt2, as "
            f"SmolLM2 and Llama 3 have); this model's tokenizer is {kind}. Export it with "
            "format=hf instead"
        )
    return data


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types for ids 0..vocab_size-1, as llama.cpp's converter lists them
    (get_vocab_base): added special tokens are CONTROL, other added tokens USER_DEFINED,
    ids the tokenizer lacks become UNUSED "[PAD<id>]" placeholders."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GymError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the "
                       f"model's vocab_size {vocab_size}; they cannot be written")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, [int(t) for t in types]


def pre_tokenizer(tokenizer, merges: list) -> str:
    """llama.cpp's name for the text splitting the tokenizer applies before its merges."""
    if not merges:
        # Without merges every token is one byte (or a special token), so how the text
        # is split first cannot change the ids: llama.cpp's default split is exact.
        return "default"
    ids = tokenizer.encode(_PRE_CHECK_TEXT)  # with special tokens, as llama.cpp hashes it
    digest = sha256(str(ids).encode()).hexdigest()
    if digest not in _PRE_BY_HASH:
        raise GymError(
            "format=gguf does not know this tokenizer's pre-tokenizer (llama.cpp check hash "
            f"{digest[:16]}...; known: {', '.join(sorted(_PRE_BY_HASH.values()))}), so "
            "llama.cpp would split text differently from transformers. Export with format=hf"
        )
    return _PRE_BY_HASH[digest]


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether encoding adds this special token (at the start / end) by itself."""
    if token_id is None:
        return False
    ids = tokenizer("a").input_ids
    bare = tokenizer("a", add_special_tokens=False).input_ids
    return len(ids) > len(bare) and (ids[0] if first else ids[-1]) == token_id


class _Writer(gguf.GGUFWriter):
    """``gguf.GGUFWriter`` that also writes empty arrays: gguf-py refuses them, but the
    format allows them, and llama.cpp needs ``tokenizer.ggml.merges`` present even when a
    byte-level vocabulary has no merges (model=tiny's)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def write_gguf(model, tokenizer, path: Path, outtype: str, name: str,
               base_name: str | None = None) -> None:
    """Write ``model`` (a LlamaForCausalLM or Qwen3ForCausalLM, fp32 weights) and
    ``tokenizer`` to ``path``."""
    if outtype not in OUTTYPES:
        raise GymError(f"gguf.outtype={outtype!r} is not one of {', '.join(OUTTYPES)}")
    check_supported(model)
    cfg = model.config
    data = _bpe_json(tokenizer)
    file_type, weight_type = OUTTYPES[outtype]
    weight_qtype = gguf.GGMLQuantizationType[weight_type]
    arch = ARCHITECTURES[_architecture(model)][1]

    writer = _Writer(path, gguf.MODEL_ARCH_NAMES[arch])
    n_params = sum(p.numel() for p in model.parameters())
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    if base_name:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_name)

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[file_type])

    tokens, types = vocabulary(tokenizer, cfg.vocab_size)
    merges = data["model"].get("merges") or []
    with tempfile.TemporaryDirectory() as tmp:
        # gguf's SpecialVocab reads the merges, special token ids and chat template from
        # the saved tokenizer files, as llama.cpp's converter does.
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=bool(merges), n_vocab=cfg.vocab_size,
                                    special_token_types=("bos", "eos", "unk", "pad"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer, merges))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not merges:
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)
    # What encoding adds, measured on the tokenizer itself (tokenizer files do not always
    # say, and llama.cpp's defaults differ by vocabulary type).
    special.add_special_token = {
        "bos": _adds(tokenizer, tokenizer.bos_token_id, first=True),
        "eos": _adds(tokenizer, tokenizer.eos_token_id, first=False),
    }
    if tokenizer.chat_template and not special.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    permute = arch == gguf.MODEL_ARCH.LLAMA
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd (no output.weight in the file)
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GymError(f"the model's tensor {key!r} has no llama.cpp name; format=gguf "
                           f"writes plain {', '.join(ARCHITECTURES)} weights only")
        w = tensor.detach().to(torch.float32).cpu()
        # transformers' Llama rotates the dimension pairs (i, i + d/2) of each head
        # (rotate_half); llama.cpp's, like the original Llama checkpoints, rotates adjacent
        # pairs (2i, 2i + 1). So convert_hf_to_gguf.py reorders the rows of Q and K within
        # each head (LlamaModel.permute), and transformers' GGUF loader reorders them back.
        # llama.cpp rotates Qwen3 as transformers does (NEOX order): no permutation.
        if permute and key.endswith("q_proj.weight"):
            w = _permute(w, cfg.num_attention_heads)
        elif permute and key.endswith("k_proj.weight"):
            w = _permute(w, cfg.num_key_value_heads)
        arr = w.numpy()
        qtype = gguf.GGMLQuantizationType.F32 if arr.ndim <= 1 or new.endswith("_norm.weight") \
            else weight_qtype
        try:
            packed = gguf.quants.quantize(arr, qtype)
        except gguf.QuantError:  # rows not a multiple of the block size: f16, as llama.cpp
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(arr, qtype)
        writer.add_tensor(new, packed, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Each head's rows [r_0 .. r_{d/2-1}, r_{d/2} .. r_{d-1}] reordered to
    [r_0, r_{d/2}, r_1, r_{d/2+1}, ...] (convert_hf_to_gguf.py's LlamaModel.permute;
    n_head: the heads of this projection, attention heads for Q, key/value heads for K)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_types(path: Path) -> dict[str, str]:
    """{tensor name: ggml type name} of a GGUF file (for reports and tests)."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
