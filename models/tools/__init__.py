"""The offline tools behind the ``genserve`` command: training, evaluation, calibration, OOD and
classification reports, the linear probe, data loading, the real-upload suite. They use the models
and scoring (the rest of models/) and no web code; the service's command line (service/cli.py) adds
their subcommands beside ``serve``, and nothing else in models/ or service/ imports them."""
