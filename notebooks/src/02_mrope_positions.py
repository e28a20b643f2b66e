# %% [markdown]
# # 02 · MRoPE: three positions per token
#
# Qwen3-VL rotates each query and key by a position, like any RoPE model, but every token has three
# position numbers: **t** (time), **h** (row) and **w** (column). Text tokens use the same number
# three times; an image's tokens share one t and spread h and w over the image's grid. Inside
# attention, each rotary frequency channel listens to one of the three (the interleaved
# `T H W T H W ... T T` map).
#
# Runs on the tiny checkpoint (set `MODEL_DIR` or `HF_DIR` for a real one). Nothing here runs the
# model: positions depend only on the token ids and the image's grid.

# %%
# %matplotlib inline
import numpy as np

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.positions import build_positions, mrope_channel_axes, next_positions
from qwen3vl_lab.viz import (
                             inv_freq_per_channel,
                             mrope_angles,
                             plot_image_positions,
                             plot_mrope_channels,
                             plot_positions,
                             prompt_layout,
)

model = notebook.open_model()
print(notebook.describe())

# %% [markdown]
# ## 1. Text only: t = h = w
#
# For a text-only prompt the three rows are identical and count 0, 1, 2, ...: MRoPE is then
# exactly the usual 1-D RoPE.

# %%
text = prompt_layout(model, "Where is the cat?")
plot_positions(text.position_ids, text.labels)

# %%
t, h, w = text.position_ids
assert (t == h).all() and (h == w).all()
assert t.tolist() == list(range(len(t)))

# %% [markdown]
# ## 2. Text, image, text
#
# The chat template puts the image between text: `<|im_start|>user\n<|vision_start|>` then one
# `<|image_pad|>` per 32 x 32-pixel cell of the resized image, then `<|vision_end|>Who is this?...`.
# Here the image is resized to 320 x 256 pixels: a 20 x 16 grid of 16-pixel patches, merged 2 x 2 into
# 10 x 8 cells, so 80 image tokens.

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
# - the token after the image continues at s + max(rows, cols), not at s + number of image tokens,
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
# ## 3. Decoding continues from the largest position
#
# `rope_deltas = max position + 1 - number of tokens` (negative with an image). The k-th generated
# token then sits at `S + k + rope_delta` on all three axes, without looking back at the prompt.

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
# ## 4. Which channel listens to which axis
#
# A head of dimension `head_dim` has `head_dim / 2` rotary frequencies; channel j and j + head_dim/2
# rotate together. Qwen3-VL interleaves them: channel j follows H when `j % 3 == 1` (for the first
# `3 * mrope_section[1]` channels), W when `j % 3 == 2` (first `3 * mrope_section[2]`), T otherwise.
# Fast frequencies (small j) see all three axes; the slowest ones only T.

# %%
image_token = int(cells[3, 5])
plot_mrope_channels(model.config.text, position=pos[:, image_token])

# %%
cfg = model.config.text
axes = mrope_channel_axes(cfg.mrope_section, cfg.head_dim)
print("".join(axes))
assert (axes == "H").sum() == cfg.mrope_section[1] and (axes == "W").sum() == cfg.mrope_section[2]
assert (axes == "T").sum() == cfg.head_dim // 2 - cfg.mrope_section[1] - cfg.mrope_section[2]
# a text token at p rotates channel j by p * freq_j: plain 1-D RoPE
p = 7
assert np.allclose(mrope_angles(cfg, (p, p, p)), p * inv_freq_per_channel(cfg))
# an image token does not: its H and W channels use its row and column
assert not np.allclose(mrope_angles(cfg, pos[:, image_token]), pos[0, image_token] * inv_freq_per_channel(cfg))

# %% [markdown]
# The real Qwen3-VL-2B (head_dim 128, `mrope_section` [24, 20, 20]) has the same pattern, longer:

# %%
from qwen3vl_lab.config import parse_hf_config
from qwen3vl_lab.export.tiny import hf_config_dict

text_2b = parse_hf_config(hf_config_dict("2b")).text
axes_2b = "".join(mrope_channel_axes(text_2b.mrope_section, text_2b.head_dim))
print(axes_2b)
assert axes_2b == "THW" * 20 + "TTTT"
plot_mrope_channels(text_2b)

# %% [markdown]
# ## 5. Explore
#
# Pick a token: its (t, h, w) among all positions and, for an image token, the 32 x 32-pixel cell
# of the image it stands for.

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
print("02_mrope_positions: all checks passed")
