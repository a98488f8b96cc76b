# The two set-up commands of the README. Both install what they need themselves (scripts/install.sh prints
# the path of the cached virtual environment on its last line): the server and the lab (`idp-serve prepare`
# converts and compresses the default model with the lab's tools), and for `make test` the test bench too.
# The Docker images install the server alone (see the Dockerfile).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

.PHONY: serve test prepare
serve:  ## fresh machine -> server on the embedded default model and bank (http://127.0.0.1:8000)
	@venv=$$(IDP_EXTRAS=lab scripts/install.sh | tail -n 1); "$$venv/bin/idp-serve" prepare; exec "$$venv/bin/idp-serve" serve

test:   ## fresh machine -> the whole test suite, architecture and lint checks included (CI runs exactly this)
	@scripts/install-test-tools.sh
	@venv=$$(IDP_EXTRAS=lab,test scripts/install.sh | tail -n 1); "$$venv/bin/idp-serve" prepare; "$$venv/bin/python" -m pytest -q

prepare:
	@venv=$$(IDP_EXTRAS=lab scripts/install.sh | tail -n 1); "$$venv/bin/idp-serve" prepare
