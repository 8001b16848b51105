from kedro.pipeline import Node, Pipeline

from .nodes import train_policy


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                train_policy,
                inputs=["base_policy", "prompts", "aligned", "unaligned", "params:training"],
                outputs=[
                    "trained_policy",
                    "training_metrics",
                    "training_completions",
                    "training_checkpoints",
                    "trained_policy_model",  # an MLflow Model, logged and registered
                ],
                name="train_policy_node",
            )
        ]
    )
