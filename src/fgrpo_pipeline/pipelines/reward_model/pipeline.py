from kedro.pipeline import Node, Pipeline

from .nodes import fit_reward_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                fit_reward_model,
                inputs=["reward_pairs_train", "reward_pairs_test", "params:reward_model"],
                outputs=["reward_model", "reward_model_report", "reward_model_history"],
                name="fit_reward_model_node",
            )
        ]
    )
