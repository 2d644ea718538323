from sd35_mlx.convert import main  # `python convert.py --hf-path ... [-q]`: see docs/convert.md

if __name__ == "__main__":
    raise SystemExit(main())
