from kedro.pipeline import Node, Pipeline

from .nodes import compare_divergences, plot_comparison_curves


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                compare_divergences,
                inputs=[
                    "base_policy",
                    "prompts",
                    "aligned",
                    "unaligned",
                    "params:comparison",
                    "params:training",
                    "params:evaluation",
                ],
                outputs=[
                    "divergence_comparison",
                    "comparison_runs",
                    "comparison_curves_table",
                    "comparison_base",
                ],
                name="compare_divergences_node",
            ),
            Node(
                plot_comparison_curves,
                inputs="comparison_curves_table",
                outputs="comparison_curves",
                name="plot_comparison_curves_node",
            ),
        ]
    )
