"""The pipeline stages: each module a short ``main()`` that ``deepopt.cli`` dispatches to."""
