"""A training example: token ids and the labels the loss reads, and one prompt/response
exchange cut to max_length; what every prompt format builds its examples from."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: label of a token the loss ignores (PyTorch cross-entropy's default ignore_index)
IGNORE_INDEX = -100
#: when the prompt is too long, the response still keeps this share of max_length
MIN_RESPONSE_SHARE = 0.25


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence; ``labels[i]`` is ``input_ids[i]`` or IGNORE_INDEX on the prompt."""

    input_ids: list[int]
    labels: list[int]
    #: whether max_length cut any token or turn
    truncated: bool
    #: turns of a conversation left out whole to fit max_length
    dropped_turns: int = 0


def exchange_example(prompt: list[int], header: list[int], response: list[int],
                     max_length: int) -> tuple[TokenizedExample, bool]:
    """``prompt header response`` with the response alone labelled, cut to max_length; and
    whether the prompt was cut.

    When the sequence is too long the response keeps the room the whole prompt leaves, but
    at least ``MIN_RESPONSE_SHARE`` of max_length; a prompt that must give way loses tokens
    from its end while its start and the ``header`` (the cue the response follows) stay.
    The example therefore keeps at least one labelled token.
    """
    kept_prompt, kept_response = _fit(prompt, header, response, max_length)
    input_ids = kept_prompt + kept_response
    example = TokenizedExample(
        input_ids, labels=[IGNORE_INDEX] * len(kept_prompt) + kept_response,
        truncated=len(input_ids) < len(prompt) + len(header) + len(response))
    return example, len(kept_prompt) < len(prompt) + len(header)


def _fit(prompt: list[int], header: list[int], response: list[int],
         max_length: int) -> tuple[list[int], list[int]]:
    """(prompt + header, response) cut to max_length tokens together; see exchange_example."""
    if len(prompt) + len(header) + len(response) <= max_length:
        return prompt + header, response
    response_room = max(max_length - len(prompt) - len(header),
                        math.ceil(max_length * MIN_RESPONSE_SHARE))
    response = response[:response_room]
    header_room = min(len(header), max_length - len(response))
    prompt_room = max_length - len(response) - header_room
    return prompt[:prompt_room] + header[len(header) - header_room:], response
