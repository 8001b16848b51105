from kedro.pipeline import Node, Pipeline

from fgrpo_pipeline.pipelines.arms import arm_pipeline, summary_inputs

from .nodes import (
    comparison_arms,
    evaluate_base,
    evaluate_held_out,
    plot_comparison_curves,
    plot_comparison_summary,
    summarise_divergences,
    train_method,
)

TRAIN_INPUTS = [
    "base_policy",
    "prompts",
    "aligned",
    "unaligned",
    "params:comparison",
    "params:training",
]
EVALUATE_INPUTS = ["base_policy", "prompts", "params:evaluation"]


def create_pipeline(**kwargs) -> Pipeline:
    arms = comparison_arms()
    return Pipeline(
        [
            Node(
                evaluate_base,
                inputs=["base_policy", "prompts", "params:evaluation"],
                outputs="comparison_base",
                name="evaluate_comparison_base_node",
            ),
            *(
                arm_pipeline(
                    arm,
                    train=train_method,
                    evaluate=evaluate_held_out,
                    train_inputs=TRAIN_INPUTS,
                    evaluate_inputs=EVALUATE_INPUTS,
                )
                for arm in arms
            ),
            Node(
                summarise_divergences,
                inputs=["params:comparison", "comparison_base", *summary_inputs(arms)],
                outputs=[
                    "divergence_comparison",
                    "comparison_runs",
                    "comparison_curves_table",
                    "comparison_metrics",
                ],
                name="compare_divergences_node",
            ),
            Node(
                plot_comparison_curves,
                inputs="comparison_curves_table",
                outputs="comparison_curves",
                name="plot_comparison_curves_node",
            ),
            Node(
                plot_comparison_summary,
                inputs=["divergence_comparison", "comparison_base"],
                outputs="comparison_summary_plot",
                name="plot_comparison_summary_node",
            ),
        ]
    )
