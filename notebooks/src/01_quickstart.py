# %% [markdown]
# # 01 · Quickstart: one prompt, one visible step at a time
#
# qwen3vl-lab runs Qwen3-VL with ONNX Runtime as a few small functions, each returning numpy
# arrays you can look at:
#
# ```
# tokenize -> embed -> build_positions -> prefill -> decode_step -> decode_step -> ...
# ```
#
# This notebook makes a tiny random-weight checkpoint, exports it to ONNX, walks one prompt through
# those functions (tokens, embeddings, positions, prefill, a few decode steps with the KV cache
# growing) and then generates. The tiny model talks nonsense, but every shape and every step is
# the real Qwen3-VL's.
#
# **Real model:** set `MODEL_DIR` (a folder written by `qwen3vl-lab export`) or `HF_DIR` (a Hugging
# Face checkpoint, exported once into a cache folder) before starting Jupyter.

# %%
# %matplotlib inline
import tempfile
from pathlib import Path

import numpy as np

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.export.exporter import export
from qwen3vl_lab.export.tiny import make_tiny
from qwen3vl_lab.model import load_model
from qwen3vl_lab.steps import build_positions, decode_step, embed, prefill, tokenize

# %% [markdown]
# ## 1. A checkpoint and its ONNX export
#
# `make_tiny` writes a checkpoint in the Hugging Face layout (`config.json` + `model.safetensors`),
# like `qwen3vl-lab make-tiny --output_dir DIR`. `export` turns it into three ONNX graphs (embedding,
# vision tower, text decoder), like `qwen3vl-lab export --hf_dir DIR --output_dir OUT --with_attentions`.
# `with_attentions` adds the attention probabilities as extra decoder outputs, for the plots.

# %%
model_dir = notebook.user_model_dir()  # MODEL_DIR or HF_DIR when you set one
if model_dir is None:
    work = Path(tempfile.mkdtemp(prefix="qwen3vl-quickstart-"))
    hf_dir = make_tiny(work / "tiny-hf", seed=0)
    print("checkpoint files:", sorted(p.name for p in hf_dir.iterdir()))
    model_dir = export(hf_dir, work / "tiny-onnx", with_attentions=True, progress=False)

model = load_model(model_dir)
print("export files:", sorted(p.name for p in model.folder.iterdir()))
cfg = model.config.text
print(f"{cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, {cfg.num_attention_heads} query heads, "
      f"{cfg.num_key_value_heads} key/value heads, head_dim {cfg.head_dim}, vocabulary {cfg.vocab_size}")

# %% [markdown]
# ## 2. Tokens
#
# The prompt goes through the chat template (`<|im_start|>user ... <|im_end|>` and the assistant's
# header), then the tokenizer. `ids` is `(batch, S)`.

# %%
from qwen3vl_lab.viz import token_labels

prompt = "Describe a cat in one sentence."
ids = tokenize(model, prompt)  # (1, S)
labels = token_labels(model.tokenizer, ids[0], model.config)
S = ids.shape[1]
print(ids.shape)
print(list(zip(ids[0].tolist(), labels)))
assert prompt in model.tokenizer.decode(ids[0])

# %% [markdown]
# ## 3. Embeddings
#
# The embedding graph looks one row up per token: `(1, S)` ids become `(1, S, hidden)` vectors.
# The same token gets the same vector wherever it sits; where it sits is added later, by rotating
# queries and keys inside attention (RoPE), not here.

# %%
embeds = embed(model, ids)  # (1, S, H)
print(embeds.shape)
im_start = np.flatnonzero(ids[0] == ids[0, 0])  # <|im_start|> opens both the user and the assistant turn
print("<|im_start|> at", im_start.tolist())
assert embeds.shape == (1, S, cfg.hidden_size)
assert len(im_start) >= 2 and np.array_equal(embeds[0, im_start[0]], embeds[0, im_start[-1]])

# %% [markdown]
# ## 4. Positions: three numbers per token
#
# Qwen3-VL gives every token a (t, h, w) position. For text all three are the same running index,
# so text-only prompts get ordinary 1-D RoPE. Images make them differ (notebook 02).

# %%
positions = build_positions(ids)  # position_ids (3, 1, S), rope_deltas (1, 1)
print(positions.position_ids[:, 0])
pos = positions.position_ids[:, 0]
assert (pos[0] == pos[1]).all() and (pos[1] == pos[2]).all(), "text tokens have t == h == w"
assert pos[0].tolist() == list(range(S))
assert int(positions.rope_deltas[0, 0]) == 0

# %% [markdown]
# ## 5. Prefill
#
# One decoder call over the whole prompt. It returns the logits for the next token (only the last
# position's by default) and a KV cache holding every layer's keys and values for the S positions.

# %%
step = prefill(model, embeds, positions)
print("logits", step.logits.shape, "| cache length", step.cache.length, "| layer 0 keys", step.cache.keys[0].shape)
top = np.argsort(-step.logits[0])[:5]
print("most likely next tokens:", [model.tokenizer.decode([t]) for t in top])
assert step.logits.shape == (1, cfg.vocab_size)
assert step.cache.length == S and step.cache.keys[0].shape == (1, cfg.num_key_value_heads, S, cfg.head_dim)

# %% [markdown]
# ## 6. Decode steps: one token in, the cache one longer
#
# Each decode step feeds only the newest token; everything earlier is read from the cache. The
# cache is plain data passed in and returned (nothing is hidden in the session).

# %%
tokens = []
for k in range(4):
    token = step.logits.argmax(axis=-1)  # greedy, (1,)
    tokens.append(int(token[0]))
    step = decode_step(model, token[:, None], step.cache, positions.rope_deltas)
    print(f"step {k + 1}: fed {model.tokenizer.decode(tokens[-1:])!r} at (t, h, w) = "
          f"{step.position_ids[:, 0, 0].tolist()}; cache length {step.cache.length}, {step.cache.nbytes / 1024:.0f} KiB")
assert [r.kind for r in step.cache.history] == ["prefill"] + ["decode"] * 4
assert [r.length for r in step.cache.history] == list(range(S, S + 5))
assert step.position_ids[:, 0, 0].tolist() == [S + 3] * 3  # the 4th new token sits at S + 3

# %%
from qwen3vl_lab.viz import plot_kv_cache

plot_kv_cache(step.cache.history)

# %% [markdown]
# ## 7. The cache is exact
#
# Feeding the whole sequence (prompt + the 4 new tokens) again, without a cache, gives the same
# next-token logits as the last decode step: the cache only saves work.

# %%
full = np.concatenate([ids, np.array([tokens])], axis=1)  # (1, S + 4)
again = prefill(model, embed(model, full), build_positions(full))
diff = np.abs(again.logits - step.logits).max()
print(f"max |logits with cache - logits recomputed| = {diff:.2e}")
assert diff < 1e-4

# %% [markdown]
# ## 8. Generate
#
# `generate_tokens` is the same loop (prefill once, then decode steps), yielding token ids;
# `stream_text` turns them into text without splitting multi-byte characters.
# (`qwen3vl_lab.Qwen3VLPipeline(model_dir).generate(prompt)` wraps all of this.)

# %%
from qwen3vl_lab.generate import generate_tokens, prepare_prompt
from qwen3vl_lab.pipeline import greedy
from qwen3vl_lab.tokenizer import stream_text

generated = list(generate_tokens(model, prepare_prompt(model, prompt), greedy, max_new_tokens=12, eos_token_ids=[]))
print(repr("".join(stream_text(model.tokenizer, generated))))
assert generated[:5] == tokens + [int(step.logits[0].argmax())], "the loop above made the same greedy choices"

# %% [markdown]
# ## 9. See every step
#
# `record_generation` runs the same step functions once and keeps every step's logits, attention
# and cache record, so plots and sliders only index arrays.

# %%
from qwen3vl_lab.viz import plot_step_probabilities, record_generation

trace = record_generation(model, prompt, max_new_tokens=8)
assert trace.tokens.tolist() == generated[:8]
assert trace.cache_lengths.tolist() == list(range(S, S + 8))
plot_step_probabilities(trace, k=5)

# %% [markdown]
# The generation explorer: the slider picks a decode step and shows which cached tokens the newest
# token attended to (one row per head), the top next tokens (the chosen one in red) and the cache
# length so far.

# %% tags=["main-figure"]
from qwen3vl_lab.viz.widgets import GenerationExplorer, generation_figure

generation_figure(trace, step=4)

# %%
explorer = GenerationExplorer(trace)
explorer

# %%
explorer.step.value = 3  # what moving the slider does
assert explorer.figure.get_suptitle().startswith("generation step 3")
print("01_quickstart: all checks passed")
