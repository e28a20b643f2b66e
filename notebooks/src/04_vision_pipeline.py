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
# **Questions this lesson answers** (try them before reading on):
#
# 1. A 96 x 96 picture costs how many tokens of the prompt? A 448 x 448 one?
# 2. `pixel_values` has one row per 16 x 16 patch. Which row holds the patch in row r, column c of the picture?
# 3. What is **DeepStack**, and what does the model's answer lose without it?
#
# Runs on the trained shapes model (`qwen3vl-lab make-tiny --trained`, a tiny Qwen3-VL trained on
# `qwen3vl_lab.shapes.task` scenes: 96 x 96 pixels, a 3 x 3 grid of cells, one or two shapes) with a
# scene it has never seen, so the answer at the end can be checked. Set `MODEL_DIR` or `HF_DIR` for
# a real model. Exercises: `qwen3vl_lab.apps.lessons.vision` (checks and reference solutions).

# %%
# %matplotlib inline
import numpy as np

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.apps.lessons import vision as lesson
from qwen3vl_lab.generate import generate_tokens, prepare_multimodal_prompt, preprocess_visuals
from qwen3vl_lab.image import load_image, resize_image
from qwen3vl_lab.model import load_model
from qwen3vl_lab.pipeline import greedy
from qwen3vl_lab.shapes import task as shapes
from qwen3vl_lab.shapes.evaluate import answer, evaluate_shapes
from qwen3vl_lab.shapes.pieces import piece_variants
from qwen3vl_lab.stats import format_accuracy
from qwen3vl_lab.steps import build_positions, deepstack_embeds, embed, encode_image, merge_vision, prefill, tokenize
from qwen3vl_lab.viz import plot_token_on_image, seen_image
from qwen3vl_lab.viz.pieces import plot_deepstack
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
#
# **Predict before you run.** The scene is 96 x 96 pixels. How many patches? How many image tokens
# (one per 2 x 2 block of patches)? And for a 448 x 448 photo? Write your numbers down, then run the cell.

# %%
visuals = preprocess_visuals(model, [scene], image_size=size)
pixel_values, grid = visuals.pixel_values, visuals.image_grid_thw  # (N, 1536), (1, 3)
t, h, w = grid[0]
print(f"pixel_values {pixel_values.shape}, image_grid_thw {grid.tolist()}: {t} x {h} x {w} patches")
assert pixel_values.shape == (t * h * w, 3 * 2 * 16 * 16)
photo = preprocess_visuals(model, [np.zeros((448, 448, 3), np.uint8)], image_size=(448, 448)).image_grid_thw[0]
print(f"96 x 96: {h} x {w} = {h * w} patches -> {h * w // 4} image tokens | "
      f"448 x 448: {photo[1]} x {photo[2]} = {photo[1] * photo[2]} patches -> {photo[1] * photo[2] // 4} image tokens")
assert (h * w // 4, photo[1] * photo[2] // 4) == (9, 196), "(H / 32) x (W / 32) tokens: 3 x 3 and 14 x 14"

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
# ### Exercise: which row holds patch (r, c)?
#
# The patch grid of this scene is 6 x 6 (rows r, columns c, in patches). `pixel_values` does not list
# the patches row by row: the merger turns each 2 x 2 block of patches into one image token, so the four
# patches of a block are four consecutive rows -- blocks in reading order, and inside a block top-left,
# top-right, bottom-left, bottom-right. Write `patch_row(r, c, grid_w)`, the row of `pixel_values` that
# holds patch (r, c) of a grid `grid_w` patches wide. `lesson.check_patch_row` cuts the 16 x 16 squares out
# of three pictures itself and says where your row holds the wrong pixels, with a hint.

# %%
def patch_row(r: int, c: int, grid_w: int) -> int:
    raise NotImplementedError  # your code here: a few lines of integer arithmetic


lesson.check_patch_row(patch_row)

# %% [markdown]
# The reference solution (read it after trying: `lesson.patch_row??`), checked the same way, and used to
# find the object's patches in `pixel_values`:

# %%
assert lesson.check_patch_row(lesson.patch_row)
r0, c0 = 2 * objects[0].row, 2 * objects[0].col  # the top-left patch of the object's cell
row = lesson.patch_row(r0, c0, int(w))
print(f"patch ({r0}, {c0}) is row {row} of pixel_values: image token {lesson.image_token(r0, c0, int(w))} "
      f"of {h // 2 * (w // 2)}")
assert row // 4 == lesson.image_token(r0, c0, int(w)) == objects[0].row * (w // 2) + objects[0].col

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
# ## 3. The vision tower, and DeepStack
#
# One call per image gives two things:
#
# - `image_features` (one row per image token, in the decoder's hidden size): the **last** vision block's
#   output, its 2 x 2 blocks of patches concatenated and mapped by the **merger** (LayerNorm, MLP) to one
#   token each. These replace the `<|image_pad|>` embeddings, as any token embedding would enter the decoder.
# - `deepstack` features, one set per entry of `deepstack_visual_indexes`. **DeepStack** (new in Qwen3-VL)
#   taps *intermediate* vision blocks -- earlier, less abstract features -- passes each through **its own**
#   merger, and adds the j-th set to the decoder's hidden states at the image positions **right after
#   decoder layer j**, for j = 0 .. D-1. So the image enters the decoder D + 1 times: once as input
#   embeddings, then D more times, deeper each time. Only at prefill: decode steps have no image tokens.
#
# Qwen3-VL-2B taps vision blocks 5, 11 and 17 (of 24) and adds them after decoder layers 0, 1 and 2 (of
# 28); the shapes model, with 2 vision blocks and 4 decoder layers, taps both blocks:

# %%
plot_deepstack(24, (5, 11, 17), 28, title="Qwen3-VL-2B: vision blocks 5, 11, 17 -> their own mergers -> "
                                          "added after decoder layers 0, 1, 2 (of 28)")

# %%
plot_deepstack(cfg.vision.depth, cfg.vision.deepstack_visual_indexes, cfg.text.num_hidden_layers)

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
# `qwen3vl-lab generate --image` use): same prompt, same first logits, same greedy tokens.

# %%
p = prepare_multimodal_prompt(model, prompt, [scene], image_size=size)
assert np.array_equal(p.input_ids, ids) and np.array_equal(p.inputs_embeds, embeds)
tokens = list(generate_tokens(model, p, greedy, max_new_tokens=8, eos_token_ids=[]))
assert tokens[0] == int(step.logits[0].argmax())
print("generated:", repr(model.tokenizer.decode(tokens)))

# %% [markdown]
# And the answer is right: `shapes_eval.answer` runs the same steps (greedy, stopping at
# `<|im_end|>`) and the trained model names the object's colour.

# %%
reply = answer(model, scene, prompt)
print(f"Q: {prompt}  A: {reply!r}  (expected {qa.answer!r})")
if notebook.is_shapes():  # a real model (MODEL_DIR / HF_DIR) answers in its own words
    assert reply == qa.answer

# %% [markdown]
# ## 6. The answer with and without DeepStack
#
# **Predict before you run.** Switch DeepStack off (the decoder ignores `deepstack_embeds`; the image
# features still replace the pads, so the picture still enters at the input). Will the model still name
# the colour? The shape? The place? Write down what you expect, then run.
#
# `piece_variants(..., ["no DeepStack"])` copies our fp32 export with the DeepStack additions removed from
# the graph (`debug.breakage.make_broken(..., "no_deepstack")`); both models answer every question about
# this scene, then every question about `N_SCENES` held-out scenes (exact match, with a 95% interval:
# a few dozen questions cannot pin an accuracy down to a point).

# %%
N_SCENES = 4  # held-out scenes (one and two objects alternate): 5 questions each for one object, 6 for two
no_ds = load_model(piece_variants(notebook.model_dir(default="shapes"), notebook.cache_dir() / "04-pieces",
                                  names=["no DeepStack"])["no DeepStack"])
for q in shapes.question_answer_pairs(objects):
    print(f"{q.question:34s} expected {q.answer!r:38s} with DeepStack {answer(model, scene, q.question)!r:38s} "
          f"without {answer(no_ds, scene, q.question)!r}")
with_ds, without_ds = (evaluate_shapes(m, n=N_SCENES, progress=False).table["all"] for m in (model, no_ds))
print(f"\n{N_SCENES} held-out scenes: with DeepStack {format_accuracy(with_ds['correct'], with_ds['total'])}, "
      f"without {format_accuracy(without_ds['correct'], without_ds['total'])}")
if notebook.is_shapes():
    assert with_ds["accuracy"] >= 0.8 and without_ds["accuracy"] <= with_ds["accuracy"] - 0.4, "DeepStack carries the answer"

# %% [markdown]
# Without DeepStack the trained model mostly loses the image: wrong colours and shapes, broken sentences.
# It was trained with DeepStack, so its decoder learned to read the picture from those deeper additions
# rather than from the input embeddings alone -- the numbers above are *this* model's dependence on it,
# not a law (a model trained without DeepStack answers without it). What it means for an export: a
# decoder that silently drops `deepstack_embeds` (notebook 07) answers text prompts perfectly and image
# questions badly.
#
# ## 7. What the generated tokens look at
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
