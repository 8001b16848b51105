from kedro.pipeline import Node, Pipeline

from fgrpo_pipeline.pipelines.arms import arm_pipeline, summary_inputs

from .nodes import (
    ARM_INPUTS,
    evaluate_lam,
    evaluate_safety_base,
    plot_safety_curves,
    plot_safety_latent,
    plot_safety_pareto,
    plot_safety_separation,
    plot_safety_table,
    safety_arms,
    summarise_safety,
    train_lam,
)

TRAIN_INPUTS = [
    "safety_base_policy",
    "reward_model",
    "safety_prompts",
    "safety_aligned",
    "safety_unaligned",
    "params:safety_comparison",
    "params:safety_training",
]
EVALUATE_INPUTS = [
    "safety_base_policy",
    "reward_model",
    "safety_prompts",
    "params:safety_evaluation",
]
PLOTS = {
    plot_safety_table: "safety_comparison_plot",
    plot_safety_pareto: "safety_comparison_pareto",
    plot_safety_separation: "safety_comparison_separation",
}


def create_pipeline(**kwargs) -> Pipeline:
    arms = safety_arms()
    return Pipeline(
        [
            Node(
                evaluate_safety_base,
                inputs=EVALUATE_INPUTS,
                outputs=["safety_comparison_base", "safety_comparison_base_states"],
                name="evaluate_safety_base_node",
            ),
            *(
                arm_pipeline(
                    arm,
                    train=train_lam,
                    evaluate=evaluate_lam,
                    train_inputs=TRAIN_INPUTS,
                    evaluate_inputs=EVALUATE_INPUTS,
                    evaluate_outputs=("evaluation", "anchor_states"),
                )
                for arm in arms
            ),
            Node(
                summarise_safety,
                inputs=[
                    "params:safety_comparison",
                    "safety_comparison_base",
                    "safety_comparison_base_states",
                    *summary_inputs(arms, ARM_INPUTS),
                ],
                outputs=[
                    "safety_comparison_table",
                    "safety_comparison_runs",
                    "safety_comparison_curves_table",
                    "safety_comparison_latent",
                    "safety_comparison_metrics",
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
            *(
                Node(
                    plot,
                    inputs="safety_comparison_table",
                    outputs=output,
                    name=f"{plot.__name__}_node",
                )
                for plot, output in PLOTS.items()
            ),
        ]
    )
