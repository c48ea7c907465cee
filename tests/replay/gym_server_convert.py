"""NeMo Gym's own Responses -> chat conversion, as its vllm_model server does it for each model call.

Run as a program by tests/replay/test_check_gym_rollouts.py, with ``PYTHONPATH`` holding what
Gym's converter and server import (``.venv/gym-converter``, see the Makefile): it reads a JSON
list of ``responses_create_params`` on stdin and writes one ``{"messages", "tools"}`` per request:
``ResponsesConverter.responses_to_chat_completion_create_params``, the server's
``model_dump(exclude_unset=True)`` of it, and its ``_strip_hosted_only_tool_fields``, which is the
chat request the engine receives.
"""

from __future__ import annotations

import sys
import warnings

import orjson


def main() -> None:
    warnings.simplefilter("ignore")
    from nemo_gym.openai_utils import NeMoGymResponseCreateParamsNonStreaming
    from nemo_gym.responses_converter import ResponsesConverter
    from responses_api_models.vllm_model.app import VLLMModel

    converter = ResponsesConverter(return_token_id_information=False, uses_reasoning_parser=True)
    out = []
    for params in orjson.loads(sys.stdin.buffer.read()):
        body = converter.responses_to_chat_completion_create_params(
            NeMoGymResponseCreateParamsNonStreaming.model_validate(params))
        sent = body.model_dump(exclude_unset=True)
        VLLMModel._strip_hosted_only_tool_fields(sent)
        out.append({"messages": sent["messages"], "tools": sent.get("tools")})
    sys.stdout.buffer.write(orjson.dumps(out))


if __name__ == "__main__":
    main()
