"""Speculative decoding: proposers guess the next tokens, the target verifies them in one
pass (docs/speculative.md).

    proposer.py   the Proposer interface, `ngram` (prompt lookup) and `make_proposer`
    suffix.py     `suffix`: a suffix index over the request's tokens and recent outputs
    verify.py     which guesses the target accepts: the longest prefix that equals what
                  the target samples at each position (lossless for one-hot proposals)
"""

from tandem.spec_decode.proposer import NgramProposer, Proposer, make_proposer

# `synthetic_acceptance_rate` makes outputs that are not the model's: only `tandem bench`
# (which labels its records) turns this on; every other engine refuses the setting.
SYNTHETIC_ALLOWED = False

__all__ = ["NgramProposer", "Proposer", "SYNTHETIC_ALLOWED", "make_proposer"]
