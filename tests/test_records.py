"""The typed records of an iteration's files (tpo_lite.records): a record read back and written again gives the
same bytes, in the key order the files have always had (a resumed run must not change a finished file)."""
import json

from tpo_lite.pairs import PairsConfig, select_pairs
from tpo_lite.records import Judgement, Pair, PromptSamples

SAMPLES_LINE = (
    '{"prompt_id": "p1", "instruction": "Say hi.", "category": "c", "checks": [{"type": "max_words", "value": 3}], '
    '"prompt_text": "<p>", "prompt_token_ids": [1, 2], "samples": ['
    '{"index": 0, "seed": 11, "text": "T: a\\nR: hi there", "token_ids": [5, 6], "thought": "a", '
    '"response": "hi there", "valid": true, "invalid_reason": null, "finish_reason": "eos", "forced": false}, '
    '{"index": 1, "seed": 12, "text": "garbled", "token_ids": [7], "thought": "", "response": "", "valid": false, '
    '"invalid_reason": "no_response_marker", "finish_reason": "length", "forced": true}, '
    '{"index": 2, "seed": 13, "text": "T: b\\nR: hi", "token_ids": [8, 9, 10], "thought": "b", '
    '"response": "hi", "valid": true, "invalid_reason": null, "finish_reason": "eos", "forced": false}]}')
JUDGEMENT_LINE = '{"prompt_id": "p1", "judge": "test", "scores": [2.0, null, 1.0], "details": [{}, {}, {"x": 1}]}'


def _dump(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False)


def test_records_round_trip_byte_identical():
    samples = PromptSamples.from_record(json.loads(SAMPLES_LINE))
    assert samples.samples[1].forced is True and samples.samples[0].response == "hi there"
    assert _dump(samples.to_record()) == SAMPLES_LINE
    judgement = Judgement.from_record(json.loads(JUDGEMENT_LINE))
    assert judgement.scores == [2.0, None, 1.0]
    assert _dump(judgement.to_record()) == JUDGEMENT_LINE
    (pair,), _ = select_pairs([samples], [judgement], PairsConfig(rho=0.0))
    line = _dump(pair.to_record())
    assert list(json.loads(line)) == [
        "prompt_id", "prompt_text", "prompt_token_ids", "chosen_index", "rejected_index", "chosen_text",
        "rejected_text", "chosen_token_ids", "rejected_token_ids", "chosen_score", "rejected_score",
        "chosen_adjusted", "rejected_adjusted", "rho", "rejected_valid", "rejected_invalid_reason", "chosen_length",
        "rejected_length", "length_unit"]
    assert (pair.chosen_index, pair.rejected_index) == (0, 2)
    assert _dump(Pair.from_record(json.loads(line)).to_record()) == line
