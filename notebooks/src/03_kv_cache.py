# %% [markdown]
# # 03 · The KV cache: what it keeps, what it costs, when it pays
#
# **Questions this notebook answers** (try them before reading on):
# 1. To generate token n + 1, which numbers computed for tokens 1 .. n can be reused, and which cannot?
# 2. How much work is one generation step with a cache, and without one, as a formula in the context length S?
# 3. How much memory does the cache of Qwen3-VL-2B take at 32k tokens, and why does it have only half as many
#    key/value heads as query heads?
# 4. Is the cache always faster?
#
# Attention needs every earlier token's key and value. The decoder graph takes the cache in
# (`past_key_values.{i}.key/value`) and hands the grown one out (`present.{i}.*`); here the cache is plain
# numpy data, passed into each step and returned from it.
#
# Runs on the trained shapes model (a tiny Qwen3-VL: 4 layers, hidden size 128; set `MODEL_DIR` or `HF_DIR`
# for a real one). The memory figures use the real Qwen3-VL-2B dimensions.

# %%
# %matplotlib inline
import numpy as np

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.apps.lessons import kv_cache as lesson
from qwen3vl_lab.cache import bytes_per_token
from qwen3vl_lab.config import parse_hf_config
from qwen3vl_lab.export.tiny import hf_config_dict
from qwen3vl_lab.generate import prepare_multimodal_prompt, preprocess_visuals
from qwen3vl_lab.positions import build_positions
from qwen3vl_lab.shapes import task as shapes
from qwen3vl_lab.steps import decode_step, embed, prefill
from qwen3vl_lab.viz import plot_kv_cache
from qwen3vl_lab.viz.cache import kv_bytes, measure_cache_speed, plot_cache_speed, plot_kv_memory, step_macs

model = notebook.open_model(default="shapes")
cfg = model.config.text
text_2b = parse_hf_config(hf_config_dict("2b")).text  # Qwen3-VL-2B's text config (no weights needed)
print(notebook.describe(default="shapes"))

# %% [markdown]
# ## 1. What prefill leaves behind
#
# Per layer, keys and values of shape `(batch, kv_heads, T, head_dim)`, after q/k-norm and rotary position:
# exactly what later queries will be compared with. A new token cannot change them (attention is causal:
# token i never looks at later tokens), which is why they can be kept. The queries are not kept: each is used
# once, by its own token.

# %%
scene, objects = shapes.make_scene(5)
question = shapes.question_answer_pairs(objects, kinds=["describe"])[0].question
prompt = prepare_multimodal_prompt(model, question, [scene], image_size=(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE))
ids, S = prompt.input_ids, prompt.length  # (1, S)
step = prefill(model, prompt.inputs_embeds, prompt.positions, deepstack=prompt.deepstack)
cache0 = step.cache
print(f"{cfg.num_hidden_layers} layers x keys {cache0.keys[0].shape} + values {cache0.values[0].shape}")
print(f"{bytes_per_token(cfg)} bytes per token x {cache0.length} tokens = {cache0.nbytes} bytes")
assert cache0.length == S and len(cache0.keys) == cfg.num_hidden_layers
assert cache0.nbytes == bytes_per_token(cfg) * S

# %% [markdown]
# ## 2. Decode: one token in, one position more
#
# **Predict before you run.** After 8 decode steps, how long is the cache, and did the prefill's `cache0`
# change?

# %%
steps, tokens = [step], []
for _ in range(8):
    token = steps[-1].logits.argmax(axis=-1)  # greedy, (1,)
    tokens.append(int(token[0]))
    steps.append(decode_step(model, token[:, None], steps[-1].cache, prompt.positions.rope_deltas))
cache = steps[-1].cache
print("answer so far:", repr(model.tokenizer.decode(tokens)))
print("lengths:", [s.cache.length for s in steps])
assert cache0.length == S, "the prefill cache was not changed by the decode steps"
assert [s.cache.length for s in steps] == list(range(S, S + 9))

# %% [markdown]
# S + 8, and no: each step returns a new cache and leaves the one passed in as it was (you can go back to
# it). The old entries never change: a decode step only appends the new token's key and value.

# %%
for layer in range(cfg.num_hidden_layers):
    assert np.array_equal(cache.keys[layer][:, :, :S], cache0.keys[layer])
    assert np.array_equal(cache.values[layer][:, :, :S], cache0.values[layer])
print("the first", S, "positions are bit-identical in every layer after 8 decode steps")

# %% [markdown]
# ## 3. Its growth, as recorded by the cache itself
#
# `cache.history` has one record per step: how many tokens it added, the length after it, and the bytes per
# layer. Prefill adds the whole prompt; each decode step adds one token.

# %% tags=["main-figure"]
plot_kv_cache(cache.history)

# %%
for r in cache.history:
    assert r.length == S + r.step and r.new_tokens == (S if r.kind == "prefill" else 1)
    assert r.layer_bytes == (2 * cfg.num_key_value_heads * cfg.head_dim * 4 * r.length,) * cfg.num_hidden_layers
print([(r.step, r.kind, r.new_tokens, r.length) for r in cache.history])

# %% [markdown]
# ## 4. Exercise: the cache update, and the new token's attention over it
#
# (a) Write `update_cache(past_k, past_v, k_new, v_new)`: past `(B, kv_heads, T, hd)` and the new token's
# `(B, kv_heads, 1, hd)` -> the cache one position longer, the new token last, the arrays you were given
# left as they were. (This is what the decoder's `present.*` outputs are.)
#
# (b) Write `attend_one(q, k, v)`: the new token's queries `(B, heads, 1, hd)` over the whole cache
# `(B, kv_heads, T, hd)`: softmax(q · kᵀ / √hd) · v. With grouped-query attention there are fewer key/value
# heads than query heads: query head i reads key/value head i // (heads / kv_heads). Why no causal mask?
#
# The checks say where yours differs, with a hint; the reference solutions are `lesson.update_cache` and
# `lesson.attend_one`.

# %%
def update_cache(past_k, past_v, k_new, v_new):
    raise NotImplementedError  # your code here: return (k, v)


def attend_one(q, k, v):
    raise NotImplementedError  # your code here: return (B, heads, 1, hd)


written = lesson.check_update_cache(update_cache), lesson.check_attend_one(attend_one)

# %%
assert lesson.check_update_cache(lesson.update_cache) and lesson.check_attend_one(lesson.attend_one)
# the reference update reproduces what the decoder returned for the first decode step, in every layer
for layer in range(cfg.num_hidden_layers):
    new_k, new_v = steps[1].cache.keys[layer][:, :, -1:], steps[1].cache.values[layer][:, :, -1:]
    k, v = lesson.update_cache(cache0.keys[layer], cache0.values[layer], new_k, new_v)
    assert np.array_equal(k, steps[1].cache.keys[layer]) and np.array_equal(v, steps[1].cache.values[layer])

# %% [markdown]
# (No mask: the cache holds only earlier tokens and the token itself, all of which it may see.)
#
# ## 5. The cache changes the cost, not the answer
#
# For every decode step, recompute the whole sequence from scratch (the prompt with its image, plus all
# tokens so far, no cache) and compare the next-token logits.

# %%
grid = preprocess_visuals(model, [scene], image_size=(shapes.IMAGE_SIZE,) * 2).image_grid_thw  # (1, 3): (1, 6, 6)
diffs = []
for k in range(1, len(steps)):
    new = np.array([tokens[:k]])  # (1, k)
    seq = np.concatenate([ids, new], axis=1)  # (1, S + k)
    embeds = np.concatenate([prompt.inputs_embeds, embed(model, new)], axis=1)  # image features kept
    deepstack = np.pad(prompt.deepstack, ((0, 0), (0, 0), (0, k), (0, 0)))  # new tokens get no DeepStack
    fresh = prefill(model, embeds, build_positions(seq, grid), deepstack=deepstack)
    diffs.append(float(np.abs(fresh.logits - steps[k].logits).max()))
print("max |cached - recomputed| per step:", [f"{d:.1e}" for d in diffs])
assert max(diffs) < 1e-4

# %% [markdown]
# ## 6. What it costs, as formulas
#
# Per layer, a token run through the decoder costs its projections and MLP, `d x (q + 2 kv + o) + 3 d x ff`
# multiply-adds: **O(d²)**; and its query against n keys costs `2 n x q_size`: **O(n·d)**.
#
# | next token at context S | decoder runs on | work per layer |
# |---|---|---|
# | without a cache | all S tokens (token i against i + 1 keys) | **O(S·d²) + O(S²·d)** |
# | with the cache | 1 token (against S keys) | **O(d²) + O(S·d)** |
#
# Both then run the lm_head (d x vocabulary) on one position. `step_macs` counts it all.
#
# **Predict before you run.** On this small model (d = 128, vocabulary 151,936), how many times less work is
# the cached step at S = 32? At S = 2,048? And on Qwen3-VL-2B (d = 2,048)?

# %%
print(f"{'S':>6} | {'this model: cached / recomputed MACs':>38} | {'Qwen3-VL-2B: cached / recomputed MACs':>40}")
for n in (32, 256, 2048):
    here = step_macs(cfg, n, True), step_macs(cfg, n, False)
    big = step_macs(text_2b, n, True), step_macs(text_2b, n, False)
    print(f"{n:>6} | {here[0]:>12.3g} / {here[1]:>9.3g} = 1/{here[1] / here[0]:<6.1f} | "
          f"{big[0]:>12.3g} / {big[1]:>9.3g} = 1/{big[1] / big[0]:<6.1f}")
lm_head = cfg.hidden_size * cfg.vocab_size
print(f"lm_head alone: {lm_head:.3g} multiply-adds, {lm_head / step_macs(cfg, 32, True):.0%} of this model's cached step at S = 32")
assert step_macs(cfg, 32, False) / step_macs(cfg, 32, True) < 3 < step_macs(text_2b, 32, False) / step_macs(text_2b, 32, True)

# %% [markdown]
# On this small model the lm_head (one row of 151,936 logits) is most of a step's work, and it is the same
# with or without a cache: at short context the cache saves little arithmetic. On the 2B model the layers
# dominate and the cache saves about S times the work from the start.
#
# ## 7. Measured: where the two cross on this machine
#
# Arithmetic is not time: every decoder call also pays a fixed cost (ONNX Runtime's launch, input binding,
# for the teaching decoder copying the cache in and out as numpy arrays and returning every attention
# probability). Below, the next token at S = 32 ... 2,048, timed on this machine (median of 3): one decode
# step with S − 1 tokens cached, against recomputing all S tokens (a prefill of S tokens, which is what each
# step costs without a cache). Two decoder graphs: the fast one (`model-fast.onnx`, KV buffers written in
# place) and the teaching one (`model.onnx`, used above). The times are shown, not asserted: they depend on
# the machine and on what else runs on it.

# %%
timings = [measure_cache_speed(model, fast=True), measure_cache_speed(model, fast=False)]
for t in timings:
    cross = t.crossover()
    print(f"{t.decoder}: cached {np.round(t.cached_ms, 1).tolist()} ms, recomputed {np.round(t.recomputed_ms, 1).tolist()} ms"
          f" at S = {t.lengths.tolist()}")
    print(f"  -> the cache is faster at every measured length from S = {cross} on" if cross is not None
          else "  -> the cache never won at every longer length in this run")
plot_cache_speed(*timings)

# %% [markdown]
# Read the plot from the right: at 2,048 tokens the recomputed step costs many times a cached one, and the
# gap keeps growing (S² against S). At the left, both are dominated by the fixed cost of a call, so a short
# context can show the cache no faster, or even slower (the teaching decoder copies the whole cache through
# numpy every step). The printout says where the curves crossed in this run; on a real model (d = 2,048) the
# layers' arithmetic dwarfs the fixed cost and the cache wins from the first tokens.
#
# ## 8. What it weighs: Qwen3-VL-2B
#
# `2 (K and V) x layers x kv_heads x head_dim x bytes` per cached token. Qwen3-VL-2B has 28 layers, 16 query
# heads but only **8 key/value heads** (grouped-query attention: two query heads share each key/value head),
# head_dim 128.

# %%
per_token = {(dtype, heads): int(kv_bytes(text_2b, 1, 4 if dtype == "fp32" else 2, heads))
             for dtype in ("fp32", "fp16") for heads in (8, 16)}
for (dtype, heads), b in per_token.items():
    print(f"{dtype}, {heads} kv heads: {b / 1024:.0f} KiB per token; 32k tokens -> {b * 32768 / 2**30:.1f} GiB")
assert per_token["fp32", 8] == 2 * 28 * 8 * 128 * 4 == 224 * 1024 == bytes_per_token(text_2b)
assert per_token["fp32", 16] == 448 * 1024 and per_token["fp16", 8] == 112 * 1024
plot_kv_memory(text_2b, name="Qwen3-VL-2B")

# %% [markdown]
# GQA halves the cache (224 instead of 448 KiB per token in fp32) at the same number of query heads; fp16
# halves it again. At 32k tokens the fp32 GQA cache alone is 7 GiB, about as much as the fp32 weights.
#
# ## 9. Explore a generation
#
# The slider walks the decode steps: the newest token's attention over the cache (one row per head), the top
# next tokens, and the cache length so far.

# %%
from qwen3vl_lab.viz import record_generation
from qwen3vl_lab.viz.widgets import GenerationExplorer

trace = record_generation(model, question, max_new_tokens=8, images=[scene], image_size=(shapes.IMAGE_SIZE,) * 2)
assert trace.tokens.tolist() == tokens[:8]
explorer = GenerationExplorer(trace)
explorer

# %%
explorer.step.value = 5
assert explorer.figure.get_suptitle().startswith("generation step 5")

# %% [markdown]
# **Answers to the opening questions.** (1) The keys and values of earlier tokens (causal attention never
# changes them); not the queries, each used once. (2) Without a cache O(S·d²) + O(S²·d) per step, with it
# O(d²) + O(S·d) (section 6). (3) 224 KiB per token in fp32, 7 GiB at 32k tokens; full multi-head attention
# would need twice that (section 8). (4) No: a call's fixed cost dominates at short context on a small model;
# the cache wins once S grows (section 7 measured where on this machine).

# %%
print("03_kv_cache: all checks passed")
