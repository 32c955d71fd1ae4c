from sdtrt.cli import main

raise SystemExit(main())
