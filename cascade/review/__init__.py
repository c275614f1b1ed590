"""Human review: the store and consumer of review tasks, the reviewers' web page, decisions out, appeals, feedback.

See docs/review.md. `cascade review serve` runs the consumer, the publisher and the page in one process.
"""
