from smi.cli import main

raise SystemExit(main())
