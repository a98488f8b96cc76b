"""`idp-serve evaluate`, the paper's comparison, one module per job:

- `scoring`: held-out perplexity, the log-likelihood of multiple-choice answers, greedy answers;
- `examples`: which test examples are evaluated and what a request holds for each (selection sees only that);
- `methods`: the ways to run a model compared (base, compressed, single prompt, IDP, forced prompts);
- `lora`: the LoRA baseline, trained like the single prompt at a comparable parameter budget;
- `records`: per-example records of every method on the same examples;
- `statistics`: bootstrap confidence intervals, chance, the summary per method;
- `leaks`: the check that no evaluated example occurs in any training text;
- `server_check`: the same scores through a live server's `/v1/completions`;
- `compare`: `evaluate_all`, all of the above in order.

Scores are computed on float32 weights from the same folder vLLM serves, so they can equal the served ones.
"""
