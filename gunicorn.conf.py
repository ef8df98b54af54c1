"""gunicorn settings for `gunicorn wsgi:app` in the project folder: the same as `api-buddy`'s, from buddy.serve.

Bind and log level from the config (command-line flags win), 4 workers (WEB_CONCURRENCY) of 64 threads
(BUDDY_THREADS) of buddy.worker.DeadlineWorker, and the master's hooks: with no Redis configured, it starts
the embedded redis-server before the workers fork, restarts it if it dies, and stops it on exit.
A SIGHUP re-executes this file, and so re-reads the config.
"""
from buddy.serve import gunicorn_options, settings_or_exit

# bind, loglevel, logconfig_dict, logger_class, workers, worker_class, threads, graceful_timeout, timeout,
# on_starting, when_ready, on_exit
globals().update(gunicorn_options(settings_or_exit()))
