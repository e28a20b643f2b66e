# %% [markdown]
# # 05 · Does INT4 hurt the answers? Quantization measured on a model that works
#
# `qwen3vl-lab export --precision int4` turns the decoder's MatMul weights into onnxruntime
# `MatMulNBits`: 4-bit integers in blocks of 32 along the input dimension, one scale per block. Does
# that change what the model *says*? Random weights cannot tell (their text is noise either way), so
# this notebook runs on the trained shapes model (`qwen3vl-lab make-tiny --trained`, notebook 04),
# whose answers about fresh scenes are simply right or wrong:
#
# 1. **fp32 vs INT4, answer by answer**, on held-out scenes;
# 2. **where quantization really breaks the answers**: fewer bits (3, 2) and coarser scales (one
#    per matrix), recipe by recipe, broken answers next to intact ones;
# 3. **the doctor's views** of a fine and a broken recipe on one image question: per step (teacher
#    forcing) and per layer (SQNR);
# 4. **the checklist** of known INT4 bugs, and a deliberately broken model it catches.
#
# **Real and simulated recipes.** onnxruntime's `MatMulNBits` runs 2-, 4- and 8-bit weights in
# blocks of 16 to 256 (its CPU kernel refuses 3 bits); every 4- and 2-bit recipe without `sim-` in
# its name is a real onnxruntime model made by `MatMulNBitsQuantizer`. 3 bits and one scale per whole
# matrix ("per tensor") are **SIMULATED** (`qwen3vl_lab.debug.simulate`): the fp32 weights are rounded
# to that grid and kept as plain fp32 MatMuls — the numbers such a kernel would multiply by, without
# its speed or memory savings. At 2 and 4 bits this rounding equals onnxruntime's bit for bit
# (`tests/test_accuracy.py`); the names start with `sim-` and every table and figure says SIMULATED.
#
# `MODEL_DIR` (an export with `cpu-fp32/`) or `HF_DIR` runs sections 3 and 4 on your own model;
# sections 1 and 2 score the shapes task's exact answers, so they need the shapes model.

# %%
# %matplotlib inline
import tempfile
from pathlib import Path

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.debug import (
    PromptSpec,
    SimRecipe,
    compare_layers,
    free_greedy,
    make_broken,
    run_checklist,
    teacher_forced,
)
from qwen3vl_lab.export.quantize import Int4Recipe
from qwen3vl_lab.model import load_model
from qwen3vl_lab.shapes import task as shapes
from qwen3vl_lab.shapes.accuracy import load_variant, recipe_accuracy
from qwen3vl_lab.shapes.evaluate import answer
from qwen3vl_lab.viz import plot_int4_summary
from qwen3vl_lab.viz.int4 import plot_recipe_accuracy

root = notebook.model_dir(default="shapes")
print(notebook.describe(default="shapes"))
SHAPES = notebook.is_shapes()  # the trained shapes model: its answers can be scored
variants = notebook.cache_dir() / "05-variants"  # every recipe is built here once, and reused on re-runs
N = 12  # held-out scenes (one and two objects alternate); every question of each

INT4 = Int4Recipe()  # what `export --precision int4` writes: block 32, symmetric, accuracy_level 4, int4 lm_head
RECIPES = [
    "fp32",
    INT4,
    Int4Recipe(block_size=128, symmetric=False, accuracy_level=0),  # the quantizer's own defaults: block 128
    SimRecipe(bits=4, block_size=None),  # 4 bits, one scale per matrix (SIMULATED)
    SimRecipe(bits=3, block_size=None),  # 3 bits, one scale per matrix (SIMULATED)
    Int4Recipe(bits=2, block_size=16, symmetric=False),  # 2 bits in small blocks: a real MatMulNBits model
    SimRecipe(bits=2, block_size=None),  # 2 bits, one scale per matrix (SIMULATED)
    SimRecipe(bits=2, block_size=None, clip=True),  # ... with an error-minimising clipping search (SIMULATED)
    SimRecipe(bits=2, block_size=None, symmetric=False),  # ... asymmetric: min..max in 4 levels (SIMULATED)
]

# %% [markdown]
# ## 1. fp32 vs INT4, answer by answer
#
# `recipe_accuracy` builds every recipe from the fp32 export (into `variants`, once) and asks each
# variant every question about the same `N` fresh scenes: exact match, greedy. All recipes of this
# notebook are scored here in one go; this section shows fp32 and the INT4 that `export` writes.
# Columns: accuracy per question type, `all`; `formed` = answers that are *some* answer of the task,
# right or wrong ("Red." for a blue circle is wrong but well formed); `=fp32` = answers identical to
# fp32's (a question fp32 gets wrong may well be wrong for every recipe).

# %%
if SHAPES:
    result = recipe_accuracy(root, RECIPES, n=N, out_dir=variants)
    first = result.select(["fp32", INT4])
    print(first.table())
    print()
    print(first.examples_table(k=4))
    fp32_acc, int4_acc = result.row("fp32").accuracy(), result.row(INT4).accuracy()
    print(f"\nINT4 {int4_acc:.0%} vs fp32 {fp32_acc:.0%}: the same answer as fp32 to "
          f"{result.same_as(INT4):.0%} of {len(result.questions)} questions")
    assert fp32_acc >= 0.8, "the trained model answers most held-out questions"
    assert int4_acc >= fp32_acc - 0.03, "INT4 stays within 3 points of fp32"
    assert result.same_as(INT4) >= 0.9, "INT4 gives fp32's answer to (nearly) every question"
else:
    print("not the shapes model: sections 1 and 2 need its exact answers (skipped)")

# %% [markdown]
# At this scale INT4 costs nothing visible: the model gives fp32's answers. That is the normal case
# for a trained model, and it is why "INT4 talks gibberish" almost always means a *bug* (section 4)
# rather than 4-bit rounding itself.
#
# ## 2. Where quantization really breaks the answers
#
# Two knobs decide how far a weight moves when it is rounded: the **bits** (16, 8, 4 levels at 4, 3
# and 2 bits) and **how many weights share one scale** (a block of 16..256 weights along the input
# dimension, or the whole matrix). One scale per matrix has to cover the matrix's largest weight, so
# at 2 bits most weights round to zero or to one of two big steps. Hatched bars are SIMULATED; the
# diamond marks well-formed answers: a bar far left of its diamond is a model that still talks but
# errs, both far left is word salad.

# %% tags=["main-figure"]
if SHAPES:
    print(result.table())
    fig = plot_recipe_accuracy(result, title=f"trained shapes model, {N} held-out scenes ({len(result.questions)} "
                                             "questions): exact-match accuracy per recipe")
else:
    fig = None
fig

# %% [markdown]
# The same questions, answered by fp32, INT4 and the best and worst 2-bit recipes: small blocks keep
# the answers intact; one scale per matrix turns them into broken sentences or word salad.

# %%
if SHAPES:
    two_bit = [r for r in result.rows if r.bits == 2]
    worst = min(two_bit, key=lambda r: r.accuracy())
    best = max(two_bit, key=lambda r: r.accuracy())
    print(result.select(["fp32", INT4, best.recipe, worst.recipe]).examples_table(k=4))
    assert best.recipe.block_size is not None and worst.recipe.block_size is None, "blocks keep it; per tensor breaks"
    print(f"\n2-bit: best {best.name} {best.accuracy():.0%} ({best.well_formed:.0%} well formed), "
          f"worst {worst.name} {worst.accuracy():.0%} ({worst.well_formed:.0%} well formed)")
    four_bit = [r for r in result.rows if r.bits == 4]
    assert all(r.accuracy() >= fp32_acc - 0.05 for r in four_bit), "every 4-bit recipe, even per tensor, stays close"
    assert worst.accuracy() < 0.6, "a 2-bit recipe really breaks the answers"
    assert best.accuracy() >= worst.accuracy() + 0.25, "a better 2-bit recipe keeps most of them"
    assert worst.well_formed < best.well_formed, "the broken recipe's answers stop being sentences of the task"
    bad = worst.recipe
else:
    bad = SimRecipe(bits=2, block_size=None, symmetric=False)  # a recipe that breaks most models

# %% [markdown]
# ## 3. The doctor's view: why the broken recipe breaks
#
# The doctor (`qwen3vl_lab.debug`) compares a variant with fp32 on the *same* tokens. Here both get
# one image question (`PromptSpec` with a scene: the vision tower, DeepStack and 3-D positions run as
# in generation). Per step, teacher forcing: both models read fp32's greedy tokens and we compare
# their next-token distributions (KL, and an x where the top token differs). Per layer: the SQNR
# (signal-to-quantization-noise ratio, dB, higher is closer to fp32) of every layer's attention
# output, MLP output and residual stream over the prompt. `compare_weights` (not shown) goes on to
# the individual MatMulNBits blocks.

# %%
fp32 = load_model(root, "fp32")
int4 = load_variant(root, INT4, variants)  # the same folders section 1 scored
broken = load_variant(root, bad, variants)
image, objects = shapes.heldout_scene(1)  # a two-object scene no training batch contained
question = shapes.question_answer_pairs(objects, kinds=["describe"])[0]
prompt = PromptSpec(question.question, image=image)
print(f"{question.question!r}, expected {question.answer!r}")
views = {}
for name, model in (("int4", int4), (bad.name, broken)):
    run = free_greedy(fp32, model, prompt, n_steps=20)
    views[name] = (run, teacher_forced(fp32, model, prompt, n_steps=20), compare_layers(fp32, model, prompt))
    _, forced, layers = views[name]
    print(f"{name:28s} says {run.test_text!r} (first divergence from fp32: step {run.first_divergence}); "
          f"teacher forced: mean KL {forced.mean_kl:.4f}, top-1 agreement {forced.agreement:.0%}; "
          f"residual stream SQNR {' / '.join(f'{v:.1f}' for v in layers.series('hidden', 'sqnr_db'))} dB")
(_, f_int4, l_int4), (run_bad, f_bad, l_bad) = views["int4"], views[bad.name]
sqnr_int4, sqnr_bad = l_int4.series("hidden", "sqnr_db"), l_bad.series("hidden", "sqnr_db")
assert f_int4.mean_kl < f_bad.mean_kl and f_int4.agreement >= f_bad.agreement
assert sqnr_int4.min() > 15, "INT4's error power stays below 3% of the signal in every layer"
assert sqnr_int4[-1] > sqnr_bad[-1] + 6, "the broken recipe has at least 4x INT4's noise power"
assert sqnr_bad[-1] < sqnr_bad[0] and run_bad.first_divergence is not None, "its error grows; its text parts from fp32"
plot_int4_summary(f_int4, l_int4, title="fp32 vs INT4 (block 32, symmetric, accuracy_level 4): one image question")

# %%
plot_int4_summary(f_bad, l_bad, name=bad.name,
                  title=f"fp32 vs {bad.name}{' (SIMULATED)' if getattr(bad, 'simulated', False) else ''}: "
                        "the same question")

# %% [markdown]
# INT4's error stays far below the signal in every layer (SQNR above 15 dB: under 3 % of its power),
# so the next-token distributions barely move. The broken recipe's error is a sizeable share of the
# signal from the first layer on and grows down the residual stream; the distributions drift, and
# its own greedy text parts from fp32's within a few tokens.
#
# ## 4. The checklist, and a deliberately broken model
#
# The checklist tests known causes of INT4 (and port) gibberish. To see it catch one, break a copy of
# the fp32 export on purpose: skip q/k-norm in every layer (a real bug of some Qwen3 ports). It is
# fp32, yet on the shapes model its answer breaks: gibberish is more often a bug than the bits.

# %%
checks = run_checklist(int4, reference=fp32)
print(checks.table())
no_qk_norm = make_broken(fp32.folder, Path(tempfile.mkdtemp()) / "no-qk-norm", "no_qk_norm")
broken_checks = run_checklist(no_qk_norm, precision="fp32")
print(broken_checks.item("qk_norm").status, "-", broken_checks.item("qk_norm").evidence)
said = answer(load_model(no_qk_norm), image, question.question)
print(f"the fp32 model without q/k-norm says {said!r} (expected {question.answer!r})")
assert checks.item("qk_norm").status == "pass" and broken_checks.item("qk_norm").status == "fail"
if SHAPES:
    assert said != question.answer, "no q/k-norm breaks a trained model's answer"
print("05_int4_debugging: all checks passed")
