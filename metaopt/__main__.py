"""``python -m metaopt info`` (the ``metaopt`` command)."""

if __name__ == "__main__":
    from metaopt.cli import main

    raise SystemExit(main())
