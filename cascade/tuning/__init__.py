"""The task-tuned encoder: MiniLM fine-tuned end to end with masked multi-task heads.

`fit` trains it (torch, the `train` extra), `export` writes the one serving graph
(token ids → embedding + head scores) in fp32 and int8, `card` writes its model card.
"""
