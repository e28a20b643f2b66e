# %% [markdown]
# # 04 · From pixels to tokens: the vision pipeline
#
# An image enters Qwen3-VL as ordinary positions in the token sequence:
#
# ```
# preprocess -> pixel patches (N, 1536)          16 x 16-pixel patches, 2 frames, 3 colours
# tokenize   -> <|image_pad|> x (N / 4)          one token per 2 x 2 block of patches
# encode     -> image features (N / 4, hidden)   the vision tower (+ DeepStack features)
# merge      -> the features replace the pads   embeddings (1, S, hidden)
# positions  -> (t, h, w) over the image grid    notebook 02
# prefill    -> with DeepStack added inside the first decoder layers
# ```
#
# Runs on the trained shapes model (`qwen3vl-lab make-tiny --trained`, a tiny Qwen3-VL trained on
# `qwen3vl_lab.shapes.task` scenes: 96 x 96 pixels, a 3 x 3 grid of cells, one or two shapes) with a
# scene it has never seen, so the answer at the end can be checked. Set `MODEL_DIR` or `HF_DIR` for
# a real model.

# %%
# %matplotlib inline
import numpy as np

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.generate import generate_tokens, prepare_multimodal_prompt, preprocess_visuals
from qwen3vl_lab.image import load_image, resize_image
from qwen3vl_lab.pipeline import greedy
from qwen3vl_lab.shapes import task as shapes
from qwen3vl_lab.shapes.evaluate import answer
from qwen3vl_lab.steps import build_positions, deepstack_embeds, embed, encode_image, merge_vision, prefill, tokenize
from qwen3vl_lab.viz import plot_token_on_image, seen_image
from qwen3vl_lab.viz.trace import processor_config

model = notebook.open_model(default="shapes")
cfg = model.config
print(notebook.describe(default="shapes"))
scene, objects = shapes.make_scene(3, n_objects=1)  # a fresh random scene: one object
qa = shapes.question_answer_pairs(objects, kinds=["colour"])[0]
prompt = qa.question
size = (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)  # exactly 96 x 96 pixels (None: the processor's smart_resize)
print(f"scene: {shapes.describe_scene(objects)} | question: {prompt!r} | expected answer: {qa.answer!r}")
scene

# %% [markdown]
# ## 1. Pixels -> patches
#
# The image is resized to multiples of 32 pixels and cut into 16 x 16 patches. Each patch row of
# `pixel_values` holds 3 colours x 2 frames (a still image is repeated: the tower also reads video)
# x 16 x 16 pixels = 1536 numbers. The rows come in 2 x 2 blocks, the order the merger consumes.

# %%
visuals = preprocess_visuals(model, [scene], image_size=size)
pixel_values, grid = visuals.pixel_values, visuals.image_grid_thw  # (N, 1536), (1, 3)
t, h, w = grid[0]
print(f"pixel_values {pixel_values.shape}, image_grid_thw {grid.tolist()}: {t} x {h} x {w} patches")
assert pixel_values.shape == (t * h * w, 3 * 2 * 16 * 16)

# %% [markdown]
# The patches put back together are the resized picture (up to rounding): nothing else happened to
# it. Marked: the 2 x 2 block of patches (one image token) that holds the object.

# %%
shown = seen_image(pixel_values, grid[0], processor_config(model))
resized = resize_image(load_image(scene), *size)
print("picture the tower sees:", shown.shape, "| max |difference| to the resized picture:",
      int(np.abs(shown.astype(int) - resized).max()))
assert shown.shape == (*size, 3) and np.abs(shown.astype(int) - resized).max() <= 1
cell = (objects[0].row, objects[0].col)
plot_token_on_image(shown, cell, (h // 2, w // 2))

# %% [markdown]
# ## 2. Patches -> image tokens
#
# The prompt gets one `<|image_pad|>` per 2 x 2 block of patches, between `<|vision_start|>` and
# `<|vision_end|>`.

# %%
ids = tokenize(model, prompt, image_grid_thw=grid)  # (1, S)
pads = np.flatnonzero(ids[0] == cfg.image_token_id)
n_tokens = t * h * w // 4
print(f"{ids.shape[1]} tokens, {len(pads)} of them image pads ({h // 2} x {w // 2} cells)")
assert len(pads) == n_tokens and (np.diff(pads) == 1).all()
assert ids[0, pads[0] - 1] == cfg.vision_start_token_id and ids[0, pads[-1] + 1] == cfg.vision_end_token_id

# %% [markdown]
# ## 3. The vision tower
#
# One call per image: `image_features` (one row per image token, in the decoder's hidden size) and
# `deepstack` features (one set per DeepStack layer, added to the decoder's first layers' outputs).

# %%
feats = encode_image(model, pixel_values, grid)
print("image_features", feats.image_features.shape, "| deepstack", feats.deepstack.shape)
assert feats.image_features.shape == (n_tokens, cfg.text.hidden_size)
assert feats.deepstack.shape == (len(cfg.vision.deepstack_visual_indexes), n_tokens, cfg.text.hidden_size)

# %% [markdown]
# ## 4. Merge: features replace the pads
#
# The text embedding of `<|image_pad|>` is thrown away: row k of the image features goes to the k-th
# pad, in reading order. Text rows are untouched. DeepStack features become a dense input that is
# zero everywhere except at the image positions.

# %%
text_embeds = embed(model, ids)  # (1, S, H)
embeds = merge_vision(text_embeds, ids, feats, cfg.image_token_id)
deepstack = deepstack_embeds(ids, feats, cfg.image_token_id)  # (D, 1, S, H)
is_text = ids[0] != cfg.image_token_id
assert np.array_equal(embeds[0, pads], feats.image_features)
assert np.array_equal(embeds[0, is_text], text_embeds[0, is_text])
assert np.abs(deepstack[:, 0, is_text]).max() == 0 and np.array_equal(deepstack[:, 0, pads], feats.deepstack)
print("merged embeddings", embeds.shape, "| deepstack input", deepstack.shape)

# %% [markdown]
# ## 5. Positions and prefill
#
# The image's tokens share one t and spread h, w over the image's cells (notebook 02), so
# `rope_deltas` is negative. Then the decoder runs as for text, with the DeepStack input.

# %%
positions = build_positions(ids, grid, image_token_id=cfg.image_token_id,
                            spatial_merge_size=cfg.vision.spatial_merge_size)
step = prefill(model, embeds, positions, deepstack=deepstack)
print("rope_deltas", positions.rope_deltas.tolist(), "| logits", step.logits.shape)
assert int(positions.rope_deltas[0, 0]) == max(h, w) // 2 - n_tokens

# %% [markdown]
# The same steps are chained by `prepare_multimodal_prompt` (what `Qwen3VLPipeline` and
# `qwen3vl-lab generate --image` use): same prompt, same first logits, same greedy tokens. And the
# image matters: without DeepStack, or with the picture flipped, the logits change.

# %%
p = prepare_multimodal_prompt(model, prompt, [scene], image_size=size)
assert np.array_equal(p.input_ids, ids) and np.array_equal(p.inputs_embeds, embeds)
tokens = list(generate_tokens(model, p, greedy, max_new_tokens=8, eos_token_ids=[]))
assert tokens[0] == int(step.logits[0].argmax())
print("generated:", repr(model.tokenizer.decode(tokens)))
no_deepstack = prefill(model, embeds, positions)
flipped = prepare_multimodal_prompt(model, prompt, [load_image(scene)[:, ::-1].copy()], image_size=size)
flipped_step = prefill(model, flipped.inputs_embeds, flipped.positions, deepstack=flipped.deepstack)
print(f"max |logit change|: without DeepStack {np.abs(no_deepstack.logits - step.logits).max():.3f}, "
      f"flipped image {np.abs(flipped_step.logits - step.logits).max():.3f}")
assert np.abs(no_deepstack.logits - step.logits).max() > 1e-3
assert np.abs(flipped_step.logits - step.logits).max() > 1e-3

# %% [markdown]
# And the answer is right: `shapes_eval.answer` runs the same steps (greedy, stopping at
# `<|im_end|>`) and the trained model names the object's colour.

# %%
reply = answer(model, scene, prompt)
print(f"Q: {prompt}  A: {reply!r}  (expected {qa.answer!r})")
if notebook.is_shapes():  # a real model (MODEL_DIR / HF_DIR) answers in its own words
    assert reply == qa.answer

# %% [markdown]
# ## 6. What the generated tokens look at
#
# With the trace recorder, the attention of each generated token to the image's cells, laid over
# the picture (mean over heads, last layer); the slider walks the decode steps.

# %%
from qwen3vl_lab.viz import record_generation
from qwen3vl_lab.viz.widgets import GenerationExplorer, generation_figure

trace = record_generation(model, prompt, max_new_tokens=6, images=[scene], image_size=size)
assert trace.tokens.tolist() == tokens[:6]
assert trace.image_cells()[0].size == n_tokens

# %% tags=["main-figure"]
generation_figure(trace, step=0)  # prefill: the prompt's last token predicts the answer

# %%
explorer = GenerationExplorer(trace)
explorer

# %%
explorer.step.value = 2
assert explorer.figure.get_suptitle().startswith("generation step 2")
print("04_vision_pipeline: all checks passed")
