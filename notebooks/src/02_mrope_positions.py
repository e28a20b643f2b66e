# %% [markdown]
# # 02 · MRoPE: three positions per token
#
# **Questions this notebook answers** (try them before reading on):
# 1. Attention compares token vectors; nothing in a dot product says which token came first. Where does
#    a transformer get order from, and why do only *differences* of positions matter?
# 2. In an image, the patch *below* a patch is as close as the one to its right. Can one number per token
#    say that? Why does Qwen3-VL give every token three, **t** (time), **h** (row) and **w** (column)?
# 3. Qwen2.5-VL already had three. What did Qwen3-VL change, and why?
#
# Nothing here runs the decoder: positions depend only on the token ids and the image grid, and RoPE is
# arithmetic. The figures of rotary channels use the real Qwen3-VL-2B dimensions (head_dim 128,
# `rope_theta` 5e6, `mrope_section` [24, 20, 20]); the prompts use the tiny checkpoint's tokenizer and
# image processor (set `MODEL_DIR` or `HF_DIR` for a real one: the same positions come out).

# %%
# %matplotlib inline
import numpy as np

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.apps.lessons import mrope as lesson
from qwen3vl_lab.config import parse_hf_config
from qwen3vl_lab.export.tiny import hf_config_dict
from qwen3vl_lab.generate import preprocess_visuals
from qwen3vl_lab.positions import build_positions, mrope_channel_axes, next_positions
from qwen3vl_lab.shapes import task as shapes
from qwen3vl_lab.steps import tokenize
from qwen3vl_lab.viz import (
    inv_freq_per_channel,
    mrope_angles,
    plot_image_positions,
    plot_mrope_channels,
    plot_positions,
    prompt_layout,
)
from qwen3vl_lab.viz.positions import (
    blocked_channel_axes,
    plot_mrope_layouts,
    plot_relative_scores,
    plot_rotation_pair,
    relative_score_maps,
    rope_score,
)

model = notebook.open_model()
print(notebook.describe())
text_2b = parse_hf_config(hf_config_dict("2b")).text  # Qwen3-VL-2B's text config (no weights needed)

# %% [markdown]
# ## 1. RoPE is a rotation
#
# A query or key vector of `head_dim` numbers is cut into `head_dim / 2` pairs: channel j pairs with
# channel j + head_dim/2. A token at position p turns every pair by the angle p · freq_j, where
# freq_j = rope_theta^(-2j / head_dim): pair 0 turns by 1 radian per position, the last pair by a few
# millionths. Here is pair 0 of one vector at positions 0 to 5:

# %%
plot_rotation_pair(text_2b, channel=0, positions=range(6))

# %% [markdown]
# Turning both the query (at p_q) and the key (at p_k) and then taking their dot product leaves only the
# *difference* of the angles: the score depends on p_q − p_k, not on where the pair sits in the text.
#
# **Predict before you run.** A query at position 5 and a key at 3 give some score. Move both 100 positions
# later (105 and 103). Larger, smaller, or the same?

# %%
rng = np.random.default_rng(0)
q, k = rng.normal(size=(2, text_2b.head_dim))  # any two vectors: the property holds for all of them
near, far = rope_score(text_2b, q, k, (5, 5, 5), (3, 3, 3)), rope_score(text_2b, q, k, (105, 105, 105), (103, 103, 103))
print(f"q at 5, k at 3: {near:.6f} | q at 105, k at 103: {far:.6f}")
assert np.isclose(near, far, atol=1e-9), "only the difference of positions matters"

# %% [markdown]
# ## 2. Text only: t = h = w
#
# Qwen3-VL gives every token (t, h, w). For a text-only prompt the three rows are identical and count 0, 1,
# 2, ...: MRoPE is then exactly the usual 1-D RoPE.

# %%
text = prompt_layout(model, "Where is the cat?")
plot_positions(text.position_ids, text.labels)

# %%
t, h, w = text.position_ids
assert (t == h).all() and (h == w).all()
assert t.tolist() == list(range(len(t)))

# %% [markdown]
# ## 3. Text, image, text
#
# The chat template puts the image between text: `<|im_start|>user\n<|vision_start|>` then one
# `<|image_pad|>` per 32 x 32-pixel cell of the resized image, then `<|vision_end|>Who is this?...`.
# Here the image is resized to 320 x 256 pixels: a 20 x 16 grid of 16-pixel patches, merged 2 x 2 into
# 10 x 8 cells, so 80 image tokens.
#
# **Predict before you run.** The image's first token sits at position s. Its 80 tokens come in 10 rows of
# 8. Where does the token after the image sit: s + 80, s + 10, or s + 8?

# %%
layout = prompt_layout(model, "Who is this?", images=[notebook.sample_image()], image_size=(320, 256))
cells = layout.image_cells()[0][0]  # (rows, cols): the sequence index of each cell's token
gh, gw = cells.shape
print(f"image_grid_thw {layout.image_grid_thw.tolist()} -> {gh} x {gw} cells = {cells.size} tokens "
      f"of {len(layout.input_ids)}")
plot_positions(layout.position_ids, layout.labels, kinds=layout.token_kind())

# %% [markdown]
# What the plot shows, checked:
# - before the image, text counts up as usual;
# - every image token has the same t (the image's start s), h = s + row, w = s + column;
# - the token after the image continues at s + max(rows, cols) = s + 10, not at s + number of image tokens,
#   so a big image does not push the text far away.

# %%
pos = layout.position_ids  # (3, S)
s = int(cells[0, 0])  # the first image token's index = its start position
rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
assert (pos[0][cells] == s).all(), "one t for the whole image"
assert (pos[1][cells] == s + rows).all() and (pos[2][cells] == s + cols).all(), "h, w walk the grid"
after = int(cells[-1, -1]) + 1  # <|vision_end|>
assert layout.labels[after] == "<|vision_end|>"
assert pos[:, after].tolist() == [s + max(gh, gw)] * 3
text_tokens = layout.token_kind() == 0
assert (pos[0][text_tokens] == pos[1][text_tokens]).all() and (pos[1][text_tokens] == pos[2][text_tokens]).all()
print(f"image starts at s = {s}; <|vision_end|> at index {after} gets position {s + max(gh, gw)}")

# %% [markdown]
# The image's own grid: h counts rows, w counts columns, both starting at s.

# %%
plot_image_positions(layout.position_ids, cells)

# %% [markdown]
# ## 4. Decoding continues from the largest position
#
# `rope_deltas = max position + 1 - number of tokens` (negative with an image). The k-th generated token
# then sits at `S + k + rope_delta` on all three axes, without looking back at the prompt.

# %%
ids = layout.input_ids[None]  # (1, S)
positions = build_positions(ids, layout.image_grid_thw, image_token_id=model.config.image_token_id,
                            spatial_merge_size=model.config.vision.spatial_merge_size)
S, delta = ids.shape[1], int(positions.rope_deltas[0, 0])
first_new = next_positions(np.ones((1, S + 1), np.int64), positions.rope_deltas, 1)[:, 0, 0]
print(f"S = {S}, rope_delta = {delta} (= {max(gh, gw)} - {gh * gw}), first new token at {first_new.tolist()}")
assert np.array_equal(positions.position_ids[:, 0], layout.position_ids)
assert delta == max(gh, gw) - gh * gw
assert first_new.tolist() == [int(pos.max()) + 1] * 3

# %% [markdown]
# ## 5. Exercise: `get_rope_index` for one image
#
# Write `rope_index_one_image(n_before, grid_thw, n_after)`: the (3, S) positions of `n_before` text tokens,
# then one image of `grid_thw = (1, h, w)` patches (merged 2 x 2: h/2 x w/2 tokens in reading order), then
# `n_after` text tokens. This is what transformers' `get_rope_index` computes for such a prompt.
#
# `lesson.check_rope_index_one_image` compares yours with `qwen3vl_lab.positions.build_positions` (tested
# against transformers) on five prompts (wide, tall and square images) and says where it differs, with a
# hint. The reference solution is `lesson.rope_index_one_image`.

# %%
def rope_index_one_image(n_before, grid_thw, n_after):
    raise NotImplementedError  # your code here: return a (3, n_before + h*w/4 + n_after) int array


written = lesson.check_rope_index_one_image(rope_index_one_image)

# %%
assert lesson.check_rope_index_one_image(lesson.rope_index_one_image), "the reference passes its own check"
print(lesson.rope_index_one_image(3, (1, 4, 6), 2))

# %% [markdown]
# ## 6. Why three numbers: what the score sees in 2-D
#
# Section 1's property holds for each axis: with MRoPE, the score between two tokens depends only on
# (Δt, Δh, Δw). Below, one image token's query against the keys of every cell of a 9 x 9 image, with the
# query and key vectors identical (all ones), so only the positions decide the score:
# - **MRoPE** (cell (r, c) at (s, s + r, s + c)): the score falls off with the 2-D distance: the cell below
#   is about as near as the cell to the right (not exactly: H and W channels turn at different speeds).
# - **1-D RoPE** (cells numbered row after row, s + r · 9 + c, as a text-only model would): the cell to the
#   right is 1 position away but the cell below is 9: only the query's own row looks near.

# %%
plot_relative_scores(text_2b, grid=(9, 9), query_cell=(4, 4))

# %%
mrope_map, flat_map = relative_score_maps(text_2b, (9, 9), (4, 4))
up, left = (4 - 1, 4), (4, 4 - 1)
print(f"score with the cell above / to the left: MRoPE {mrope_map[up]:.2f} / {mrope_map[left]:.2f}, "
      f"1-D {flat_map[up]:.2f} / {flat_map[left]:.2f} (the query with itself: {mrope_map[4, 4]:.0f})")
assert np.isclose(mrope_map[3, 4], mrope_map[5, 4]) and np.isclose(mrope_map[4, 3], mrope_map[4, 5]), "up = down"
assert abs(mrope_map[up] - mrope_map[left]) < 0.1 * abs(flat_map[up] - flat_map[left]), "MRoPE: above ~ left"
shifted = rope_score(text_2b, q, k, (40, 47, 52), (40, 45, 49))  # (dt, dh, dw) = (0, 2, 3), elsewhere
assert np.isclose(shifted, rope_score(text_2b, q, k, (7, 9, 11), (7, 7, 8))), "only (dt, dh, dw) matters"

# %% [markdown]
# ## 7. Which channel listens to which axis: blocked (Qwen2.5-VL) vs interleaved (Qwen3-VL)
#
# Each of the head_dim/2 = 64 frequency channels follows one axis. Qwen2.5-VL gave the axes **blocks**
# (`mrope_section` [16, 24, 24]: channels 0-15 T, 16-39 H, 40-63 W); Qwen3-VL **interleaves** them
# (`T H W T H W ... T T T T`, [24, 20, 20]). Since channel j's frequency falls with j, the block layout
# gives W only the slowest channels.
#
# **Predict before you run.** In the blocked layout, what is the fastest W channel's wavelength (positions
# per full turn)? Compare it with the 10 columns of the image above.

# %%
plot_mrope_layouts(text_2b)

# %%
freq = inv_freq_per_channel(text_2b)  # (64,) fast to slow
blocked = blocked_channel_axes([16, 24, 24], text_2b.head_dim)
interleaved = mrope_channel_axes(text_2b.mrope_section, text_2b.head_dim)
fastest_w_blocked = 2 * np.pi / freq[blocked == "W"].max()
fastest_w_interleaved = 2 * np.pi / freq[interleaved == "W"].max()
print(f"fastest W channel: blocked {fastest_w_blocked:,.0f} positions per turn, interleaved {fastest_w_interleaved:.1f}")
assert fastest_w_blocked > 10_000 > 100 > fastest_w_interleaved
print("".join(interleaved))
assert "".join(interleaved) == "THW" * 20 + "TTTT"

# %% [markdown]
# With blocks, moving one column to the right turns the W channels by at most 2π/96,600: across a 100-column
# image they barely move, so width is almost invisible to attention, while time gets all the fast channels.
# Interleaving gives each axis fast and slow channels alike. (The Qwen3-VL report motivates the change the
# same way: a balanced frequency spectrum per axis.)
#
# The same map on the checkpoint in use, and the angles one image token is turned by:

# %%
cfg = model.config.text
image_token = int(cells[3, 5])
plot_mrope_channels(cfg, position=pos[:, image_token])

# %%
axes = mrope_channel_axes(cfg.mrope_section, cfg.head_dim)
assert (axes == "H").sum() == cfg.mrope_section[1] and (axes == "W").sum() == cfg.mrope_section[2]
assert (axes == "T").sum() == cfg.head_dim // 2 - cfg.mrope_section[1] - cfg.mrope_section[2]
p = 7  # a text token at p rotates channel j by p * freq_j: plain 1-D RoPE
assert np.allclose(mrope_angles(cfg, (p, p, p)), p * inv_freq_per_channel(cfg))
# an image token does not: its H and W channels use its row and column
assert not np.allclose(mrope_angles(cfg, pos[:, image_token]), pos[0, image_token] * inv_freq_per_channel(cfg))

# %% [markdown]
# ## 8. Two images, and a video
#
# **Two images**: each block starts where the text before it stopped; each takes max(rows, cols) positions.

# %%
scene_a, _ = shapes.make_scene(1)
two = prompt_layout(model, "Which one has a circle?", images=[scene_a, notebook.sample_image()],
                    image_size=(128, 192))
first, second = (c[0] for c in two.image_cells())  # (rows, cols) of token indices, one per image
p2 = two.position_ids
s1, s2 = int(p2[0, first[0, 0]]), int(p2[0, second[0, 0]])  # each image's start position (its t)
print(f"image 1: {first.shape[0]} x {first.shape[1]} tokens from position {s1}; "
      f"image 2: {second.shape[0]} x {second.shape[1]} tokens from position {s2} (token index {int(second[0, 0])})")
assert (p2[0][first] == s1).all() and (p2[0][second] == s2).all()
assert s2 == s1 + max(first.shape) + 2, "<|vision_end|> and <|vision_start|> sit between the two images"
plot_positions(p2, kinds=two.token_kind())

# %% [markdown]
# **A video** of 4 frames (a shape moving right) is cut into frame *pairs* (the tower reads 2 frames per
# temporal patch). Qwen3-VL lays each pair out like an image, with its own t, and writes the time as text
# (`<0.2 seconds>`) before each pair: time lives in the timestamp tokens, not in how far t advances.

# %%
frames = [shapes.make_scene([("red", "circle", where)])[0] for where in ("left", "center", "center", "right")]
visuals = preprocess_visuals(model, videos=[frames], image_size=(96, 96))
video_ids = tokenize(model, "What moves?", video_grid_thw=visuals.video_grid_thw,
                     video_timestamps=visuals.video_timestamps)  # (1, S)
video_pos = build_positions(video_ids, video_grid_thw=visuals.video_grid_thw,
                            video_token_id=model.config.video_token_id).position_ids  # (3, 1, S)
kinds = (video_ids[0] == model.config.video_token_id).astype(int) * 2
pads = np.flatnonzero(kinds)
blocks = np.split(pads, np.flatnonzero(np.diff(pads) > 1) + 1)
print(f"video_grid_thw {visuals.video_grid_thw.tolist()}: {len(blocks)} frame pairs of {len(blocks[0])} tokens; "
      f"t = {[int(video_pos[0, 0, b[0]]) for b in blocks]}")
assert len(blocks) == visuals.video_grid_thw[0, 0]
assert all((video_pos[0, 0, b] == video_pos[0, 0, b[0]]).all() for b in blocks), "one t per frame pair"
plot_positions(video_pos, kinds=kinds)

# %% [markdown]
# ## 9. Explore
#
# Pick a token: its (t, h, w) among all positions and, for an image token, the 32 x 32-pixel cell of the
# image it stands for.

# %% tags=["main-figure"]
from qwen3vl_lab.viz.widgets import PositionExplorer, position_figure

position_figure(layout, token=image_token)

# %%
explorer = PositionExplorer(layout, token=s)
explorer

# %%
explorer.token.value = image_token
title = explorer.figure.axes[0].get_title()
print(title)
assert f"(t, h, w) = {tuple(int(v) for v in pos[:, image_token])}" in title

# %% [markdown]
# **Answers to the opening questions.** (1) From rotating queries and keys by their positions: the dot
# product of two rotated vectors depends only on the angle between them, i.e. on the difference of
# positions. (2) Because one number cannot make "below" as near as "right": with (t, h, w), the score
# depends on (Δt, Δh, Δw) (section 6). (3) The channel layout: blocks gave width only slow channels;
# Qwen3-VL interleaves them (section 7), and moves video time into timestamp text (section 8).

# %%
print("02_mrope_positions: all checks passed")
