from kedro.pipeline import Node, Pipeline

from .nodes import (
    evaluate_safety_policies,
    plot_latent_separation,
    plot_safety_training,
    train_safety_policy,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                train_safety_policy,
                inputs=[
                    "safety_base_policy",
                    "reward_model",
                    "safety_prompts",
                    "safety_aligned",
                    "safety_unaligned",
                    "params:safety_training",
                ],
                outputs=["safety_policy", "safety_training_metrics", "safety_training_completions"],
                name="train_safety_policy_node",
            ),
            Node(
                evaluate_safety_policies,
                inputs=[
                    "safety_base_policy",
                    "safety_policy",
                    "reward_model",
                    "safety_prompts",
                    "params:safety_evaluation",
                ],
                outputs=["safety_evaluation", "safety_evaluation_samples", "safety_latent"],
                name="evaluate_safety_policies_node",
            ),
            Node(
                plot_safety_training,
                inputs="safety_training_metrics",
                outputs="safety_training_curves",
                name="plot_safety_training_node",
            ),
            Node(
                plot_latent_separation,
                inputs="safety_latent",
                outputs="safety_latent_separation",
                name="plot_latent_separation_node",
            ),
        ]
    )
