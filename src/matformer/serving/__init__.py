"""`matformer serve`: one MatFormer in memory, every width served over an OpenAI-compatible API.

- `catalog`: the served model names (`NAME`, `NAME@tier-1`, `NAME@widths=...`, `NAME@auto`) and
  the width setting each stands for.
- `rows`: one decoding step for rows that each own a KV cache (batched projections and FFN,
  attention per row over its own cache).
- `policy`: which width `auto` runs at, from step costs measured on this machine.
- `engine`: the continuous-batching scheduler thread (join/leave between steps, chunked
  prefill, rows grouped by width, speculative rounds for a lone greedy request).
- `speculation`: whether a lone request's next step is a speculative round, with which nested
  draft and how many tokens (`inference.speculative`'s cost model on measured server steps).
- `chat`: the tokenizer's chat template, rendered as transformers renders it.
- `metrics`: the Prometheus text of `/metrics`.
- `protocol`: the request bodies (checked types) and OpenAI's error shape.
- `app`: the FastAPI routes; `server`: loading a checkpoint and running uvicorn.

This layer sits above `inference`/`evaluation` and below `cli`.
"""
