# %% [markdown]
# # 01 · Quickstart: one question about an image, one visible step at a time
#
# **Questions this notebook answers** (try them before reading on):
# 1. "Generate" is one call in most libraries. What runs inside it, and how many times does the model run?
# 2. Why is the first model call (*prefill*) different from every later one (*decode steps*)?
# 3. What does the model keep from one step to the next, and how big is it?
#
# qwen3vl-lab runs Qwen3-VL with ONNX Runtime as a few small functions, each returning numpy arrays:
#
# ```
# tokenize -> embed (+ image features) -> build_positions -> prefill -> decode_step -> decode_step -> ...
# ```
#
# The model here is the **trained shapes model**: a tiny Qwen3-VL (4 decoder layers, hidden size 128, the
# real vocabulary, image tower and 3-D positions) trained on pictures of one or two shapes, so it answers
# questions like *"What colour is the circle?"* correctly and its probabilities mean something. It is made
# and exported once into a cache folder (`qwen3vl-lab make-tiny --trained` then `qwen3vl-lab export`).
# Every shape and every step is the real Qwen3-VL's.
#
# **Real model:** set `MODEL_DIR` (a folder written by `qwen3vl-lab export`) or `HF_DIR` (a Hugging Face
# checkpoint, exported once into the cache folder) before starting Jupyter.

# %%
# %matplotlib inline
import numpy as np

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.apps.lessons import quickstart as lesson
from qwen3vl_lab.generate import generate_tokens, prepare_multimodal_prompt, preprocess_visuals
from qwen3vl_lab.pipeline import greedy
from qwen3vl_lab.positions import build_positions
from qwen3vl_lab.shapes import task as shapes
from qwen3vl_lab.stats import format_accuracy
from qwen3vl_lab.steps import decode_step, embed, prefill
from qwen3vl_lab.viz import plot_kv_cache, plot_top_k, softmax, token_labels

model = notebook.open_model(default="shapes")
cfg = model.config.text
print(notebook.describe(default="shapes"))
print(f"{cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, {cfg.num_attention_heads} query heads, "
      f"{cfg.num_key_value_heads} key/value heads, head_dim {cfg.head_dim}, vocabulary {cfg.vocab_size}")

# %% [markdown]
# ## 1. An image and a question
#
# `shapes.make_scene(seed)` draws a fresh 96 x 96 scene (a 3 x 3 grid of 32-pixel cells, one or two
# shapes); the question comes with the answer the model was trained to give.

# %%
scene, objects = shapes.make_scene(5)
qa = shapes.question_answer_pairs(objects, kinds=["describe"])[0]
question, size = qa.question, (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
print(f"{shapes.describe_scene(objects)} | question: {question!r} | expected answer: {qa.answer!r}")
scene

# %% [markdown]
# ## 2. Tokens, embeddings, positions: everything before the decoder
#
# `prepare_multimodal_prompt` runs the steps notebook 04 opens up one by one: the chat template puts one
# `<|image_pad|>` per 32 x 32-pixel cell between `<|vision_start|>` and `<|vision_end|>`; the embedding
# graph looks up one row per token; the vision tower's features replace the `<|image_pad|>` rows; every
# token gets a 3-D position (t, h, w) (notebook 02).

# %%
prompt = prepare_multimodal_prompt(model, question, [scene], image_size=size)
ids = prompt.input_ids  # (1, S)
S = ids.shape[1]
labels = token_labels(model.tokenizer, ids[0], model.config)
pads = np.flatnonzero(ids[0] == model.config.image_token_id)
print(f"S = {S} tokens, {len(pads)} of them <|image_pad|>; inputs_embeds {prompt.inputs_embeds.shape}")
print(" ".join(labels))
assert len(pads) == 9, "a 96 x 96 image: 3 x 3 cells of 32 x 32 pixels, one token each"
assert prompt.inputs_embeds.shape == (1, S, cfg.hidden_size)
text_embeds = embed(model, ids)  # the lookup alone, before the image features go in
assert not np.allclose(prompt.inputs_embeds[0, pads], text_embeds[0, pads]), "image rows were replaced"
assert np.array_equal(np.delete(prompt.inputs_embeds[0], pads, 0), np.delete(text_embeds[0], pads, 0))

# %%
t, h, w = prompt.positions.position_ids[:, 0]  # (S,) each
delta = int(prompt.positions.rope_deltas[0, 0])
print("t:", t.tolist())
print("h:", h.tolist())
print("w:", w.tolist())
print(f"rope_delta = {delta}: 9 image tokens take only max(3, 3) = 3 positions")
assert (t[pads] == t[pads[0]]).all() and delta == 3 - 9

# %% [markdown]
# ## 3. Prefill
#
# One decoder call over the whole prompt: logits for the next token (only the last position's) and a KV
# cache holding every layer's keys and values for the S positions.
#
# **Predict before you run.** The prompt has S tokens. How many rows of logits come back (1 or S)? How
# long is the cache afterwards? And the expected answer starts with "A": how sure will the model be?

# %%
step = prefill(model, prompt.inputs_embeds, prompt.positions, deepstack=prompt.deepstack)
probs = softmax(step.logits[0])  # (V,)
top = np.argsort(-probs)[:8]
print("logits", step.logits.shape, "| cache length", step.cache.length, "| layer 0 keys", step.cache.keys[0].shape)
assert step.logits.shape == (1, cfg.vocab_size)
assert step.cache.length == S and step.cache.keys[0].shape == (1, cfg.num_key_value_heads, S, cfg.head_dim)
plot_top_k(top, probs[top], [model.tokenizer.decode([i]) for i in top], chosen=int(top[0]),
           title=f"after prefill: the 8 most likely first tokens of the answer (of {cfg.vocab_size})")

# %% [markdown]
# One row of logits (prefill keeps only the last position's: that is all generation needs), a cache of S
# positions, and a model that is sure of its first word: it was trained on these questions. (A random-weight
# model's most likely tokens get about 1e-4 each, its entropy close to log V: such a plot would show noise.)

# %% [markdown]
# ## 4. Decode steps: one token in, the cache one longer
#
# Each decode step feeds only the newest token; everything earlier is read from the cache. The cache is plain
# data passed in and returned (nothing is hidden in the session).

# %%
tokens, steps = [], [step]
for k in range(6):
    token = steps[-1].logits.argmax(axis=-1)  # greedy, (1,)
    tokens.append(int(token[0]))
    steps.append(decode_step(model, token[:, None], steps[-1].cache, prompt.positions.rope_deltas))
    s = steps[-1]
    print(f"step {k + 1}: fed {model.tokenizer.decode(tokens[-1:])!r} at (t, h, w) = {s.position_ids[:, 0, 0].tolist()}; "
          f"cache length {s.cache.length}, {s.cache.nbytes / 1024:.0f} KiB")
step = steps[-1]
assert [r.kind for r in step.cache.history] == ["prefill"] + ["decode"] * 6
assert [r.length for r in step.cache.history] == list(range(S, S + 7))
assert step.position_ids[:, 0, 0].tolist() == [S + 5 + delta] * 3  # the 6th new token: S + 5, shifted by delta

# %% [markdown]
# The cache's own records: prefill added the whole prompt, each decode step one token.

# %%
plot_kv_cache(step.cache.history)

# %% [markdown]
# ## 5. The cache is exact
#
# Run the whole sequence again (prompt + the 6 new tokens) without a cache: the next-token logits are the
# same as the last decode step's. The cache saves work; it does not change the answer.

# %%
new = np.array([tokens])  # (1, 6)
full_ids = np.concatenate([ids, new], axis=1)  # (1, S + 6)
full_embeds = np.concatenate([prompt.inputs_embeds, embed(model, new)], axis=1)  # image features kept
grid = preprocess_visuals(model, [scene], image_size=size).image_grid_thw  # (1, 3): (1, 6, 6) patches
full_positions = build_positions(full_ids, grid, image_token_id=model.config.image_token_id)
deepstack = np.pad(prompt.deepstack, ((0, 0), (0, 0), (0, 6), (0, 0)))  # new tokens get no DeepStack
again = prefill(model, full_embeds, full_positions, deepstack=deepstack)
diff = np.abs(again.logits - step.logits).max()
print(f"max |logits with cache - logits recomputed| = {diff:.2e}")
assert diff < 1e-4

# %% [markdown]
# ## 6. Exercise: write the generation loop
#
# Write `greedy_generate(model, prompt, max_new_tokens)`: prefill the prepared prompt once (its
# `inputs_embeds`, `positions` and `deepstack`), then repeat *take the most likely token, keep it, feed it
# to `decode_step` with the cache the previous step returned*, until you have `max_new_tokens` tokens.
# Return them as a list of ints. Sections 3 and 4 have every piece.
#
# `lesson.check_greedy_generate` compares your tokens with the library's loop and, when they differ, says
# where and gives a hint. The reference solution is `lesson.greedy_generate` (read it after trying).

# %%
def greedy_generate(model, prompt, max_new_tokens):
    raise NotImplementedError  # your code here


written = lesson.check_greedy_generate(greedy_generate, model, prompt)  # prints where it differs, with a hint

# %%
assert lesson.check_greedy_generate(lesson.greedy_generate, model, prompt), "the reference passes its own check"

# %% [markdown]
# ## 7. Generate, and how often the answer is right
#
# `generate_tokens` is the same loop (prefill once, then decode steps) yielding token ids; it stops at the
# end-of-turn token. One right answer says little; below, every question of 10 held-out scenes (never seen
# in training). The interval is the 95% Wilson interval: with a few dozen questions an accuracy is only
# known to within several points either way.

# %%
answer_ids = list(generate_tokens(model, prompt, greedy, max_new_tokens=24))
answer = model.tokenizer.decode(answer_ids, skip_special_tokens=True)
print(f"{question!r} -> {answer!r} (expected {qa.answer!r})")
assert answer_ids[:6] == tokens, "the loop above made the same greedy choices"

# %%
if notebook.is_shapes():  # a real model (MODEL_DIR / HF_DIR) answers in its own words
    from qwen3vl_lab.shapes.evaluate import evaluate_shapes

    result = evaluate_shapes(model, n=10, progress=False)
    everything = result.table["all"]
    print("exact-match accuracy:", format_accuracy(everything["correct"], everything["total"]))
    assert shapes.exact_match(answer, qa.answer)
    assert everything["correct"] / everything["total"] > 0.5

# %% [markdown]
# ## 8. See every step
#
# `record_generation` runs the same step functions once and keeps every step's logits, attention and cache
# record, so plots and sliders only index arrays. Per step: the most likely tokens (the chosen one boxed)
# and the entropy of the distribution, near 0 when the model is sure (log V = 11.93 would be a uniform guess).
# Where the entropy rises, the model hesitated between words: the boxes above that step show which.

# %%
from qwen3vl_lab.viz import plot_step_probabilities, record_generation

trace = record_generation(model, question, max_new_tokens=8, images=[scene], image_size=size)
assert trace.tokens.tolist() == answer_ids[:8]
assert trace.cache_lengths.tolist() == list(range(S, S + 8))
plot_step_probabilities(trace, k=5)

# %% [markdown]
# The generation explorer: the slider picks a decode step and shows which cached tokens the newest token
# attended to (one row per head), the top next tokens (the chosen one in red) and the cache length so far.

# %% tags=["main-figure"]
from qwen3vl_lab.viz.widgets import GenerationExplorer, generation_figure

generation_figure(trace, step=4)

# %%
explorer = GenerationExplorer(trace)
explorer

# %%
explorer.step.value = 3  # what moving the slider does
assert explorer.figure.get_suptitle().startswith("generation step 3")

# %% [markdown]
# **Answers to the opening questions.** (1) Generating n tokens runs the decoder n times: one prefill over
# the prompt, then one decode step per further token. (2) Prefill reads the whole prompt at once and fills
# the cache; a decode step reads one token and the cache. (3) The KV cache: per layer, the keys and values of
# every token so far (section 4 printed its size; notebook 03 is about what it costs and saves).

# %%
print("01_quickstart: all checks passed")
