"""See it: matplotlib plots of one generation, and ipywidgets explorers over them.

Every plot is a function that takes numpy arrays (or a GenerationTrace) and returns a Figure; the
widgets in `viz.widgets` only choose which step/layer/head/token a plot shows.

    from qwen3vl_lab.viz import record_generation, plot_kv_cache
    trace = record_generation(model, "Describe a cat.", max_new_tokens=8)
    plot_kv_cache(trace.cache_history).savefig("cache.png")
"""

from .attention import plot_attention, plot_attention_grid, plot_attention_heads, plot_attention_on_image, plot_attention_row
from .cache import cache_table, plot_cache_bytes, plot_cache_length, plot_kv_cache
from .doctor import write_figures
from .int4 import plot_int4_summary, plot_layer_divergence, plot_recipe_accuracy, plot_step_divergence
from .positions import (
                        inv_freq_per_channel,
                        mrope_angles,
                        plot_image_positions,
                        plot_mrope_channels,
                        plot_positions,
                        plot_token_on_image,
)
from .probs import plot_entropy, plot_step_probabilities, plot_top_k
from .trace import (
                        GenerationTrace,
                        PromptLayout,
                        entropy,
                        image_token_cells,
                        prompt_layout,
                        record_generation,
                        seen_image,
                        softmax,
                        token_labels,
)

__all__ = [
    "GenerationTrace", "record_generation", "PromptLayout", "prompt_layout", "seen_image", "softmax", "entropy",
    "token_labels", "image_token_cells",
    "plot_attention", "plot_attention_heads", "plot_attention_grid", "plot_attention_row", "plot_attention_on_image",
    "cache_table", "plot_kv_cache", "plot_cache_length", "plot_cache_bytes",
    "plot_positions", "plot_image_positions", "plot_mrope_channels", "plot_token_on_image", "inv_freq_per_channel",
    "mrope_angles",
    "plot_top_k", "plot_entropy", "plot_step_probabilities",
    "plot_step_divergence", "plot_layer_divergence", "plot_int4_summary", "plot_recipe_accuracy", "write_figures",
]
