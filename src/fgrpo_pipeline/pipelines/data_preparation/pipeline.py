from kedro.pipeline import Node, Pipeline

from .nodes import prepare_prompts


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                prepare_prompts,
                inputs="params:data_preparation",
                outputs="prompts",
                name="prepare_prompts_node",
            )
        ]
    )
