"""Evaluation on the buyer's own data: `samples` binds arrays to a model's inputs by the sample contract
(batched or one run per sample, fixed inputs, recurrent state), `evaluate` runs a licensed model and measures
accuracy, latency and memory, `report_html` renders the report with its plots."""
