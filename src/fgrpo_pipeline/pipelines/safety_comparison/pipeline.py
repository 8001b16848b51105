from kedro.pipeline import Node, Pipeline

from .nodes import compare_safety, plot_safety_curves, plot_safety_latent, plot_safety_table


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                compare_safety,
                inputs=[
                    "safety_base_policy",
                    "reward_model",
                    "safety_prompts",
                    "safety_aligned",
                    "safety_unaligned",
                    "params:safety_comparison",
                    "params:safety_training",
                    "params:safety_evaluation",
                ],
                outputs=[
                    "safety_comparison",
                    "safety_comparison_runs",
                    "safety_comparison_curves_table",
                    "safety_comparison_latent",
                ],
                name="compare_safety_node",
            ),
            Node(
                plot_safety_curves,
                inputs="safety_comparison_curves_table",
                outputs="safety_comparison_curves",
                name="plot_safety_curves_node",
            ),
            Node(
                plot_safety_latent,
                inputs="safety_comparison_latent",
                outputs="safety_comparison_latent_separation",
                name="plot_safety_latent_node",
            ),
            Node(
                plot_safety_table,
                inputs="safety_comparison",
                outputs="safety_comparison_plot",
                name="plot_safety_table_node",
            ),
        ]
    )
