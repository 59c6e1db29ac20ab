"""The offline tools behind the ``genserve`` command: training, evaluation, calibration, OOD and
classification reports, the linear probe, data loading. They use the models (models/) and, for
``genserve serve``, the service (service/); nothing in models/ or service/ imports them."""
