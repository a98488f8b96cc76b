# The two set-up commands of the README. Both install what they need themselves (scripts/install.sh prints
# the path of the cached virtual environment on its last line).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

.PHONY: serve test prepare
serve:  ## fresh machine -> server on the embedded default model and bank (http://127.0.0.1:8000)
	@venv=$$(scripts/install.sh | tail -n 1); "$$venv/bin/idp-serve" prepare; exec "$$venv/bin/idp-serve" serve

test:   ## fresh machine -> the whole test suite (CI runs exactly this)
	@scripts/install-test-tools.sh
	@venv=$$(scripts/install.sh | tail -n 1); "$$venv/bin/idp-serve" prepare; "$$venv/bin/python" -m pytest -q

prepare:
	@venv=$$(scripts/install.sh | tail -n 1); "$$venv/bin/idp-serve" prepare
